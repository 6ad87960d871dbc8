"""Tensor parallelism on the CPU (gloo): the sharding rules, the shard-by-shard loader, TP=2 engines in two
processes against TP=1 and the reference model, and `persimmon-rt generate --tp`. Multi-GPU (NCCL, CUDA
graphs) is checked by the last test where two GPUs exist."""

import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import persimmon_rt as prt
from persimmon_rt.weights import expected_shapes
from persimmon_rt import ops
from persimmon_rt import tensor_parallel as tpm
from persimmon_rt.engine import Engine
from persimmon_rt.loading import Weights, load_weights, weights_from_module
from persimmon_rt.tensor_parallel import (FIRST_RANK, REPLICATE, SPLIT_COLUMNS, SPLIT_ROWS, TensorParallel,
                                          check_tp_config, shard_rule, take_shard)

from model_utils import random_model, tiny_config

SHAPE = dict(hidden_size=128, num_attention_heads=4, intermediate_size=256, vocab_size=96, num_hidden_layers=2)


def tp_model(dtype=torch.float32, **overrides):
    """hidden 128, 4 heads of 32, intermediate 256, vocab 96; large init so greedy decoding stays lively."""
    config = tiny_config(eos_token_id=None, initializer_range=0.25, **{**SHAPE, **overrides})
    return random_model(prt.PersimmonForCausalLM, config, dtype)


def reference_continuation(model, prompt, n):
    return model.generate(torch.tensor([prompt]), max_new_tokens=n, eos_token_id=[])[0, len(prompt):].tolist()


# ---------------------------------------------------------------------------------------------- the rules
def test_each_parameter_has_the_megatron_rule():
    names = dict(prt.PersimmonForCausalLM(tp_model().config).named_parameters())
    rules = {name: shard_rule(name) for name in names}
    assert rules["model.layers.0.self_attn.query_key_value.weight"] == SPLIT_ROWS
    assert rules["model.layers.1.self_attn.query_key_value.bias"] == SPLIT_ROWS
    assert rules["model.layers.0.self_attn.dense.weight"] == SPLIT_COLUMNS
    assert rules["model.layers.0.self_attn.dense.bias"] == FIRST_RANK
    assert rules["model.layers.0.mlp.dense_h_to_4h.weight"] == SPLIT_ROWS
    assert rules["model.layers.0.mlp.dense_h_to_4h.bias"] == SPLIT_ROWS
    assert rules["model.layers.0.mlp.dense_4h_to_h.weight"] == SPLIT_COLUMNS
    assert rules["model.layers.0.mlp.dense_4h_to_h.bias"] == FIRST_RANK
    assert rules["lm_head.weight"] == SPLIT_ROWS
    replicated = [n for n, r in rules.items() if r == REPLICATE]
    assert all(("layernorm" in n or "embed_tokens" in n) for n in replicated)
    assert "model.embed_tokens.weight" in replicated and "model.layers.0.self_attn.q_layernorm.weight" in replicated


@pytest.mark.parametrize("world", [2, 4])
def test_shards_reproduce_one_layers_projections(world):
    model = tp_model()
    c = model.config
    H, D, F_ = c.num_attention_heads, c.head_dim, c.intermediate_size
    p = dict(model.named_parameters())
    n = "model.layers.0."
    x = torch.randn(5, c.hidden_size)
    shards = [weights_from_module(model, c, (r, world)) for r in range(world)]

    # QKV, column-parallel by heads: rank r's output is heads [r*H/N, (r+1)*H/N) of the head-major full output.
    full_qkv = F.linear(x, p[n + "self_attn.query_key_value.weight"], p[n + "self_attn.query_key_value.bias"])
    parts = [F.linear(x, s.layers[0].qkv_w, s.layers[0].qkv_b) for s in shards]
    assert all(s.layers[0].qkv_w.shape == (3 * c.hidden_size // world, c.hidden_size) for s in shards)
    for r, part in enumerate(parts):
        heads = slice(r * H // world, (r + 1) * H // world)
        torch.testing.assert_close(part.view(5, H // world, 3, D), full_qkv.view(5, H, 3, D)[:, heads])
    torch.testing.assert_close(torch.cat(parts, -1), full_qkv)

    # dense, row-parallel: each rank's local heads' attention output; the sum adds the bias once.
    a = torch.randn(5, c.hidden_size)
    full = F.linear(a, p[n + "self_attn.dense.weight"], p[n + "self_attn.dense.bias"])
    cols = c.hidden_size // world
    assert [s.layers[0].dense_b is None for s in shards] == [False] + [True] * (world - 1)
    partial = [F.linear(a[:, r * cols:(r + 1) * cols], s.layers[0].dense_w, s.layers[0].dense_b)
               for r, s in enumerate(shards)]
    torch.testing.assert_close(sum(partial), full, rtol=1e-5, atol=1e-4)

    # MLP: up column-parallel (relu² is elementwise), down row-parallel over the same columns.
    full_up = torch.relu(F.linear(x, p[n + "mlp.dense_h_to_4h.weight"], p[n + "mlp.dense_h_to_4h.bias"])) ** 2
    full_down = F.linear(full_up, p[n + "mlp.dense_4h_to_h.weight"], p[n + "mlp.dense_4h_to_h.bias"])
    ups = [torch.relu(F.linear(x, s.layers[0].up_w, s.layers[0].up_b)) ** 2 for s in shards]
    assert all(s.layers[0].up_w.shape == (F_ // world, c.hidden_size) for s in shards)
    assert all(s.layers[0].down_w.shape == (c.hidden_size, F_ // world) for s in shards)
    torch.testing.assert_close(torch.cat(ups, -1), full_up)
    torch.testing.assert_close(sum(F.linear(u, s.layers[0].down_w, s.layers[0].down_b) for u, s in zip(ups, shards)),
                               full_down, rtol=1e-5, atol=1e-4)     # summed in another order

    # lm_head, vocabulary-parallel: concatenating in rank order gives the full logits.
    logits = [F.linear(x, s.lm_head) for s in shards]
    assert all(s.lm_head.shape == (c.vocab_size // world, c.hidden_size) for s in shards)
    torch.testing.assert_close(torch.cat(logits, -1), F.linear(x, model.lm_head.weight))

    # replicated tensors are the full ones
    for s in shards:
        assert torch.equal(s.embed, model.model.embed_tokens.weight)
        assert torch.equal(s.layers[1].q_ln_w, p["model.layers.1.self_attn.q_layernorm.weight"])
        assert torch.equal(s.final_ln_b, p["model.final_layernorm.bias"])


def test_row_splits_are_views_and_world_1_is_the_whole_model():
    model = tp_model()
    shard = weights_from_module(model, model.config, (1, 2))
    qkv = model.model.layers[0].self_attn.query_key_value.weight
    assert shard.layers[0].qkv_w.data_ptr() == qkv[qkv.shape[0] // 2:].data_ptr()      # no copy
    whole = weights_from_module(model, model.config, (0, 1))
    reference = weights_from_module(model, model.config)
    for a, b in zip(whole.layers[1].__dict__.values(), reference.layers[1].__dict__.values()):
        assert (a is None and b is None) or torch.equal(a, b)


def test_safetensors_slices_give_the_same_shards(tmp_path):
    from safetensors import safe_open

    model = tp_model()
    model.save_pretrained(tmp_path)
    state = model.state_dict()
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as fh:
        for name in fh.keys():
            for rank in range(2):
                from_file = take_shard(name, fh.get_slice(name), rank, 2)
                from_tensor = take_shard(name, state[name], rank, 2)
                assert (from_file is None and from_tensor is None) or torch.equal(from_file, from_tensor), name


@pytest.mark.parametrize("max_shard_bytes", [None, 200_000])
def test_load_shard_equals_slicing_the_loaded_model(tmp_path, max_shard_bytes):
    model = tp_model()
    model.save_pretrained(tmp_path, max_shard_bytes=max_shard_bytes)
    assert (tmp_path / "model.safetensors.index.json").exists() == (max_shard_bytes is not None)
    for rank in range(2):
        loaded = load_weights(tmp_path, model.config, torch.float32, "cpu", (rank, 2))
        sliced = weights_from_module(model, model.config, (rank, 2))
        for a, b in zip(_flat(loaded), _flat(sliced)):
            assert (a is None and b is None) or torch.equal(a, b)
    half = load_weights(tmp_path, model.config, torch.bfloat16, "cpu", (1, 2))
    assert all(t is None or t.dtype == torch.bfloat16 for t in _flat(half))
    assert half.layers[0].down_w.is_contiguous() and half.layers[0].down_b is None


def test_load_shard_names_what_is_missing_or_misshapen(tmp_path):
    model = tp_model()
    model.save_pretrained(tmp_path)
    with pytest.raises(prt.CheckpointError, match=r"6 wrong shape \(model.layers.0.mlp.dense_h_to_4h.weight: "
                                                  r"checkpoint \(256, 128\), model \(512, 128\); .*; and 3 more\)"):
        load_weights(tmp_path, tp_model(intermediate_size=512).config, torch.float32, "cpu", (0, 2))
    with pytest.raises(prt.CheckpointError, match=r"\d+ missing \(model.layers.2."):
        load_weights(tmp_path, tp_model(num_hidden_layers=3).config, torch.float32, "cpu", (0, 2))


@pytest.mark.parametrize("qk_layernorm, tied", [(True, False), (False, False), (True, True)])
def test_expected_shapes_match_the_model(qk_layernorm, tied):
    config = tp_model(qk_layernorm=qk_layernorm).config
    config.tie_word_embeddings = tied
    with torch.device("meta"):
        model = prt.PersimmonForCausalLM(config)
    state = {k: tuple(v.shape) for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    assert expected_shapes(config) == state


def _flat(w: Weights):
    return [w.embed, w.final_ln_w, w.final_ln_b, w.lm_head] + [t for lw in w.layers for t in vars(lw).values()]


def test_indivisible_shapes_are_rejected_clearly():
    config = tp_model().config
    with pytest.raises(ValueError, match="num_attention_heads divisible by 3, but the model has 4"):
        check_tp_config(config, 3)
    with pytest.raises(ValueError, match="intermediate_size divisible by 4, but the model has 258"):
        check_tp_config(tp_model(intermediate_size=258).config, 4)
    with pytest.raises(ValueError, match="vocab_size divisible by 4, but the model has 98"):
        check_tp_config(tp_model(vocab_size=98).config, 4)
    check_tp_config(config, 4)
    model = tp_model()
    fake = TensorParallel(0, 3)
    with pytest.raises(ValueError, match="num_attention_heads divisible by 3"):
        Engine(model, model.config, tp=fake)


def test_engine_holds_its_share_of_heads_and_cache():
    model = tp_model()
    fake = TensorParallel(1, 2)
    engine = Engine(model, model.config, max_batch_size=2, max_seq_len=16, tp=fake)
    assert engine.num_heads == 2 and engine.cache.k[0].shape == (2, 16, 2, 32)
    assert engine.weights.layers[0].dense_b is None and engine.weights.lm_head.shape == (48, 128)
    single = Engine(model, model.config, max_batch_size=2, max_seq_len=16,
                    tp=TensorParallel(0, 1))
    assert single.tp is None and single.num_heads == 4                   # TP=1 is the single-device path


# --------------------------------------------------------------------------------------- two processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, model_dir, out_dir):
    """One rank: TP engines from the directory (shard-by-shard loader) and from the loaded module."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    # Loaded before the group exists: from_pretrained builds on the meta device, which imports torch._dynamo,
    # and that import after init_process_group keeps the gloo group (and its threads) alive at exit.
    module = prt.PersimmonForCausalLM.from_pretrained(model_dir)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    tp = tpm.TensorParallel.init_from_env("cpu")
    try:
        spec = json.loads((out_dir / "spec.json").read_text())
        engine = Engine.from_pretrained(model_dir, device="cpu", max_batch_size=4, max_seq_len=64,
                                        prefill_chunk_tokens=7, tp=tp)
        result = {"greedy": engine.generate(spec["prompts"], max_new_tokens=20, stop_token_ids=[]).token_ids,
                  "seeded": engine.generate(spec["prompts"][:2], **spec["sampling"]).token_ids}
        torch.manual_seed(1000 + rank)                    # different generator states on the ranks
        result["unseeded"] = engine.generate(spec["prompts"][:2], **{**spec["sampling"], "seed": None}).token_ids
        by_module = Engine(module, module.config, max_batch_size=2, max_seq_len=32, tp=tp)
        result["module_greedy"] = by_module.generate(spec["prompts"][:2], max_new_tokens=8,
                                                     stop_token_ids=[]).token_ids
        result["nvls_env"] = {k: os.environ.get(k) for k in tpm.NVLS_OFF_ENV}
        result["kv_heads"] = engine.cache.k[0].shape[2]
        dist.barrier()
        (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        tp.shutdown()


SAMPLING = dict(max_new_tokens=12, temperature=0.9, top_k=5, top_p=0.95, seed=7, stop_token_ids=[])


@pytest.fixture(scope="module")
def tp2(tmp_path_factory):
    """Results of every rank of a TP=2 run (gloo, two processes), with the model and prompts it used."""
    model_dir, out_dir = tmp_path_factory.mktemp("tp_model"), tmp_path_factory.mktemp("tp_out")
    torch.manual_seed(0)
    model = tp_model()
    model.save_pretrained(model_dir)
    prompts = [torch.randint(1, 96, (n,)).tolist() for n in (3, 11, 6)]
    (out_dir / "spec.json").write_text(json.dumps({"prompts": prompts, "sampling": SAMPLING}))
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), str(model_dir), out_dir), nprocs=2)
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    return SimpleNamespace(model=model, prompts=prompts, ranks=ranks)


def test_tp2_greedy_equals_tp1_and_the_reference_model(tp2):
    single = Engine(tp2.model, tp2.model.config, max_batch_size=4, max_seq_len=64, prefill_chunk_tokens=7)
    expected = single.generate(tp2.prompts, max_new_tokens=20, stop_token_ids=[]).token_ids
    assert expected == [reference_continuation(tp2.model, p, 20) for p in tp2.prompts]
    for rank in tp2.ranks:
        assert rank["greedy"] == expected
        assert rank["module_greedy"] == [ids[:8] for ids in expected[:2]]
        assert rank["kv_heads"] == 2


def test_tp2_sampling_is_identical_on_every_rank(tp2):
    a, b = tp2.ranks
    assert a["seeded"] == b["seeded"] and a["unseeded"] == b["unseeded"]
    assert [len(ids) for ids in a["seeded"]] == [12, 12]
    single = Engine(tp2.model, tp2.model.config, max_batch_size=4, max_seq_len=64, prefill_chunk_tokens=7)
    # Same seed, same draws: TP=2 samples what TP=1 samples (the logits agree to rounding).
    assert a["seeded"] == single.generate(tp2.prompts[:2], **SAMPLING).token_ids


def test_init_from_env_switches_nvlink_multicast_off(tp2):
    assert tp2.ranks[0]["nvls_env"] == tpm.NVLS_OFF_ENV


# ----------------------------------------------------------------------------------------------------- CLI
def test_generate_tp_launches_one_rank_per_process(monkeypatch, capsys):
    from persimmon_rt import cli, tp_launch

    calls = []
    monkeypatch.delenv(tpm.TP_CHILD_ENV, raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(tp_launch, "launch", lambda nproc, argv: calls.append((nproc, argv)) or 0)
    code = cli.main(["generate", "--tp", "2", "--device", "cpu", "--temperature", "0.5", "--seed", "3",
                     "--stop=-x", "--json", "--max-new-tokens", "4", "--", "-prompt"])
    assert code == 0 and len(calls) == 1
    nproc, child = calls[0]
    assert nproc == 2 and child[0] == "generate" and "--tp" not in " ".join(child) and child[-2:] == ["--", "-prompt"]
    assert {"--device=cpu", "--temperature=0.5", "--seed=3", "--stop=-x", "--json", "--max-new-tokens=4"} <= set(child)
    args = cli.build_parser().parse_args(child)           # the child parses back to the same request
    assert (args.prompt, args.stop, args.temperature, args.seed, args.tp) == ("-prompt", ["-x"], 0.5, 3, None)
    assert cli.main(["generate", "hi", "--tp", "3"]) == 1
    assert "num_attention_heads divisible by 3" in capsys.readouterr().err


def test_rank_environment_and_exit_statuses(monkeypatch):
    from persimmon_rt import tp_launch

    env = tp_launch.rank_env(1, 2, 29511, base={"PATH": "/bin"})
    assert env[tpm.TP_CHILD_ENV] == "1" and all(env[k] == v for k, v in tpm.NVLS_OFF_ENV.items())
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["MASTER_ADDR"], env["MASTER_PORT"]) == \
        ("1", "1", "2", "127.0.0.1", "29511")
    monkeypatch.delenv(tpm.TP_CHILD_ENV, raising=False)
    assert tp_launch.launch(2, ["--version"]) == 0
    assert tp_launch.launch(2, ["nosuchcommand"]) == 2            # argparse's status, from the first to fail


@pytest.mark.parametrize("actions, status, most_s", [
    (["1:3", "0:sleep"], 3, 30),        # a failed rank ends the run; the sleeping one is stopped (SIGTERM)
    (["1:hang"], 1, 30),                # rank 0 ended, rank 1 never does: stopped (SIGKILL) after the bound
    ([], 0, 30),
], ids=["a-rank-fails", "a-rank-never-ends", "all-end"])
def test_the_launcher_ends_every_rank(monkeypatch, actions, status, most_s):
    import time

    from persimmon_rt import tp_launch

    monkeypatch.setattr(tp_launch, "_FOLLOW_S", 2.0)
    monkeypatch.setattr(tp_launch, "_GRACE_S", 2.0)
    monkeypatch.setenv("PYTHONPATH", os.path.join(os.path.dirname(__file__), "tp_scripts"))
    started = time.monotonic()
    assert tp_launch.launch(2, actions, module="rank_behaviour") == status
    assert time.monotonic() - started < most_s


def test_generate_tp2_on_the_demo_model_prints_once_and_matches_tp1():
    argv = ["generate", "ROMEO:", "--device", "cpu", "--json", "--temperature", "0", "--max-new-tokens", "8"]
    env = {k: v for k, v in os.environ.items() if k not in (tpm.TP_CHILD_ENV, "WORLD_SIZE")}
    run = [subprocess.run([sys.executable, "-m", "persimmon_rt", *argv, *extra], capture_output=True, text=True,
                          env=env, timeout=120) for extra in ([], ["--tp", "2"])]
    assert [r.returncode for r in run] == [0, 0], run[1].stderr
    single, parallel = (r.stdout.strip().splitlines() for r in run)
    assert len(parallel) == 1                                   # rank 0 only
    assert json.loads(parallel[0])["token_ids"] == json.loads(single[0])["token_ids"]


@pytest.mark.parametrize("sampling", [["--temperature", "0"], ["--temperature", "0.9", "--seed", "3"]],
                         ids=["greedy", "seeded"])
@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.device_count() >= 2 and ops.HAVE_CUDA_EXT
                                              else []))
def test_chat_tp2_on_the_demo_model_talks_as_one_process(sampling, device):
    """Rank 0 reads the turns and prints; the other rank generates each turn with it; commands stay local.
    On GPUs (fp16, the ranks sum in another order than one GPU) the replies agree at their start."""
    argv = ["chat", "--device", device, "--max-new-tokens", "10", *sampling]
    turns = "Hello there\n/help\nWhat is your name?\n/reset\nSpeak.\n"
    env = {k: v for k, v in os.environ.items() if k not in (tpm.TP_CHILD_ENV, "WORLD_SIZE")}
    run = [subprocess.run([sys.executable, "-m", "persimmon_rt", *argv, *extra], input=turns, capture_output=True,
                          text=True, env=env, timeout=150) for extra in ([], ["--tp", "2"])]
    assert [r.returncode for r in run] == [0, 0], run[1].stderr
    assert run[0].stdout.count("adept:") == run[1].stdout.count("adept:") == 3
    if device == "cpu":
        assert run[1].stdout == run[0].stdout
    else:
        assert [line[:12] for line in run[1].stdout.splitlines()] == [line[:12] for line in run[0].stdout.splitlines()]
    assert run[1].stderr.count("persimmon-rt chat:") == 1                  # rank 0 only


# --------------------------------------------------------------------------------------------------- GPUs
def _gpu_worker(rank, world, port, out_dir):
    torch.manual_seed(0)
    shape = dict(hidden_size=256, num_attention_heads=4, intermediate_size=512, vocab_size=96,
                 max_position_embeddings=128)                                     # head_dim 64
    model = tp_model(**shape).to(torch.float16).to(f"cuda:{rank}")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    tp = tpm.TensorParallel.init_from_env("cuda")
    try:
        prompts = [[5, 6, 7, 8, 9], list(range(1, 18)), [40, 41]]
        graphs = Engine(model, model.config, max_batch_size=4, max_seq_len=128, tp=tp)
        eager = Engine(model, model.config, max_batch_size=4, max_seq_len=128, tp=tp, use_cuda_graphs=False)
        result = {"graphs": graphs.generate(prompts, max_new_tokens=32, stop_token_ids=[]).token_ids,
                  "eager": eager.generate(prompts, max_new_tokens=32, stop_token_ids=[]).token_ids,
                  "captured": bool(graphs.graphs.graphs),
                  "sampled": graphs.generate(prompts, max_new_tokens=16, temperature=1.0, top_p=0.9).token_ids}
        result["backend"] = tp.all_reduce_backend
        for choice in ("flags", "nccl"):            # the same run on the other protocol, on NCCL + LayerNorm
            tp._fast_all_reduce = None
            os.environ[tpm.ALL_REDUCE_ENV] = choice
            other = Engine(model, model.config, max_batch_size=4, max_seq_len=128, tp=tp)
            result[choice] = other.generate(prompts, max_new_tokens=32, stop_token_ids=[]).token_ids
            result[f"{choice}_backend"] = tp.all_reduce_backend
        single = Engine(model, model.config, max_batch_size=4, max_seq_len=128)
        result["tp1"] = single.generate(prompts, max_new_tokens=32, stop_token_ids=[]).token_ids
        (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        tp.shutdown()


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2 or not ops.HAVE_CUDA_EXT,
                    reason="needs two CUDA GPUs and the built extension")
def test_tp2_on_two_gpus_captures_nccl_in_the_decode_graph(tmp_path):
    """Collectives inside the CUDA graph (the fused all-reduce + LayerNorm kernel, NCCL for the prefill and
    the vocabulary gather): graph replay gives the eager tokens, every rank agrees, the fused kernel gives
    exactly NCCL + LayerNorm's tokens (two ranks: the same sum, rounded once), and (fp16, so up to near
    ties) TP=2 follows TP=1."""
    torch.multiprocessing.spawn(_gpu_worker, args=(2, _free_port(), tmp_path), nprocs=2)
    a, b = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert "lamport" in a["backend"] and "flags" in a["flags_backend"], a
    assert a["captured"] and a["graphs"] == a["eager"] == b["graphs"] and a["sampled"] == b["sampled"]
    assert a["nccl"] == a["graphs"] == a["flags"] == b["nccl"] == b["flags"]
    agree = sum(x == y for ids, ref in zip(a["graphs"], a["tp1"]) for x, y in zip(ids[:8], ref[:8]))
    assert agree >= 20                                     # of 24: fp16 rounding may flip a near tie late


# --------------------------------------------------------------------------------------- exiting cleanly
# Every path out of a tensor-parallel run ends by itself within a bound: a normal end (above and the GPU
# test below), an error on one rank, Ctrl-C under torchrun or the command's launcher. On the CPU (gloo)
# here; on two GPUs (NCCL, graphs) where they exist.
EXIT_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.device_count() >= 2 and ops.HAVE_CUDA_EXT else [])


def _torchrun(args, **kwargs):
    env = {k: v for k, v in os.environ.items() if k not in (tpm.TP_CHILD_ENV, "WORLD_SIZE", "RANK")}
    env.update(tpm.NVLS_OFF_ENV, OMP_NUM_THREADS="1", PERSIMMON_RT_TP_TIMEOUT="60")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                             "2", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, **kwargs)


@pytest.mark.parametrize("device", EXIT_DEVICES)
def test_an_error_on_one_rank_ends_the_run_and_names_the_rank(device):
    script = os.path.join(os.path.dirname(__file__), "tp_scripts", "fail_on_one_rank.py")
    proc = _torchrun([script, device])
    try:
        _, err = proc.communicate(timeout=150)
    finally:
        os.killpg(proc.pid, 9) if proc.poll() is None else None
    assert proc.returncode != 0
    assert "persimmon-rt: error (rank 1 of 2): prompt" in err and "exceeds" in err


def _launcher(args, preexec_fn=None):
    """`persimmon-rt <args> --tp 2`: the command's own launcher (tp_launch.py) in place of torchrun."""
    env = {k: v for k, v in os.environ.items() if k not in (tpm.TP_CHILD_ENV, "WORLD_SIZE", "RANK")}
    env.update(OMP_NUM_THREADS="1", PERSIMMON_RT_TP_TIMEOUT="60")
    return subprocess.Popen([sys.executable, "-m", "persimmon_rt", *args, "--tp", "2"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=preexec_fn)


def _launcher_ignoring_sigint(args):
    """_launcher started with SIGINT ignored, as a non-interactive shell starts a background job: its ranks
    must still take the Ctrl-C it forwards."""
    import signal

    return _launcher(args, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))


@pytest.mark.parametrize("launcher", [_torchrun, _launcher, _launcher_ignoring_sigint],
                         ids=["torchrun", "tp_launch", "tp_launch-sigint-ignored"])
@pytest.mark.parametrize("device", EXIT_DEVICES)
def test_ctrl_c_ends_every_rank(device, launcher):
    import signal
    import time

    generate = ["generate", "--device", device, "--temperature", "0", "--max-new-tokens", "240", "--", "ROMEO:"]
    proc = launcher(["-m", "persimmon_rt", *generate] if launcher is _torchrun else generate[:-2] + ["ROMEO:"])
    try:
        first = proc.stdout.read(1)                     # rank 0 is streaming: the ranks are mid-decode
        if not first:
            proc.wait(timeout=90)
            pytest.fail(f"the run ended before streaming anything: {proc.stderr.read()[-2000:]}")
        os.killpg(proc.pid, signal.SIGINT)              # what a terminal's Ctrl-C sends to the foreground group
        started = time.monotonic()
        proc.communicate(timeout=90)
        assert time.monotonic() - started < 90
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            pytest.fail("the ranks were still running 90 s after Ctrl-C")
    assert proc.returncode != 0
