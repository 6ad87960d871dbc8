"""Writes the crafted inputs of the unpickle regression corpus (review-*): python tests/fuzz/crafted_unpickle.py [DEPTH]."""
import io, pickle, struct, zipfile, sys
C = "tests/fuzz/corpus/unpickle/"
def w(name, data): open(C + name, "wb").write(data); print(name, len(data))
P2 = b"\x80\x02"
# A dict key nested 150,000 tuples deep: hashing it recursed past the C stack (segfault).
w("review-deep-tuple-dict-key.pkl", P2 + b"})" + b"\x85" * 150000 + b"K\x01s.")
w("review-deep-tuple-set-member.pkl", b"\x80\x04\x8f(" + b")" + b"\x85" * 150000 + b"\x90.")
# 40 levels of [x, x] shared through the memo, then a failing torch.Size call: its message's repr is 2**40 long.
body = b"]q\x00"
for i in range(40):
    body += b"]q" + bytes([i + 1]) + b"(h" + bytes([i]) + b"h" + bytes([i]) + b"e"
w("review-exponential-repr.pkl", P2 + body + b"ctorch\nSize\nh\x28\x85R.")
# One list of 5,000 items copied 3,000 times by list() through the memo and kept on the stack (120 MB from 20 KB).
w("review-memo-copy-amplification.pkl", P2 + b"](" + b"N" * 5000 + b"eq\x00cbuiltins\nlist\nq\x01" + b"h\x01h\x00\x85R" * 3000 + b".")
# BYTEARRAY8 declaring 64 GiB: pickle allocates the declared length before reading.
w("review-bytearray8-declared-length.pkl", b"\x80\x05\x96" + struct.pack("<Q", 2**36) + b".")
# numpy's _reconstruct with a 256 MiB shape allocates it at once.
w("review-numpy-reconstruct-shape.pkl", P2 + b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ\x00\x00\x00\x10\x85C\x01b\x87R.")
# A numpy dtype whose BUILD state rewrites its fields (numpy trusts them when reading array memory).
w("review-numpy-dtype-fields-state.pkl", P2 + b"cnumpy\ndtype\nX\x02\x00\x00\x00f8\x85R(K\x03X\x01\x00\x00\x00<NX\x01\x00\x00\x00a\x85}X\x01\x00\x00\x00a"
  b"cnumpy\ndtype\nX\x02\x00\x00\x00f8\x85RJ\x00\x00\x00\x40\x86sJ\x00\x00\x00\x01K\x01K\x00tb.")
# A deflated 64 MiB storage in a 64 KiB archive (zip bomb).
buf = io.BytesIO()
pkl = P2 + b"ctorch._utils\n_rebuild_tensor_v2\n(X\x07\x00\x00\x00storagectorch\nByteStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuJ\x00\x00\x00\x04tQK\x00J\x00\x00\x00\x04\x85K\x01\x85\x89NtR."
with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
    for name, body in (("archive/data.pkl", pkl), ("archive/data/0", b"\x00" * 2**26)):
        zf.writestr(zipfile.ZipInfo(name, (2020, 1, 1, 0, 0, 0)), body, zipfile.ZIP_DEFLATED)
w("review-zip-deflate-bomb.pt", buf.getvalue())
# Objects freed recursively (no trashcan in their dealloc): nested 200 deep here, refused at the first
# level now; at 60,000 (numpy object arrays) or 300,000 (slices) deep the release crashed the interpreter.
level = b"q\x010h\x02h\x03R(K\x01h\x04h\x05\x89]h\x01atb"
w("review-numpy-object-array-chain.pkl", P2 + b"cnumpy.core.multiarray\n_reconstruct\nq\x02cnumpy\nndarray\nK\x00\x85C\x01b\x87q\x03"
  b"K\x01\x85q\x04cnumpy\ndtype\nX\x01\x00\x00\x00O\x85Rq\x050N" + level * int(sys.argv[1] if len(sys.argv) > 1 else 200) + b".")
n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
w("review-nested-slice.pkl", P2 + b"cbuiltins\nslice\n" + b"2" * (n - 1) + b"N" + b"\x85R" * n + b".")
