"""Under torchrun: every rank runs `persimmon-rt generate` on the demo model, but rank 1 with a prompt
token it cannot take (it fails after joining the process group); rank 0 then waits in a collective that
rank 1 never joins. The run must end by itself, naming rank 1."""

import os
import sys

from persimmon_rt.cli import main

device = sys.argv[1]
bad = os.environ["RANK"] == "1"
argv = ["generate", "--device", device, "--temperature", "0", "--max-new-tokens", "200", "--", "ROMEO:"]
if bad:
    argv[argv.index("--max-new-tokens") + 1] = "100000"          # beyond the context: refused on rank 1 only
sys.exit(main(argv))
