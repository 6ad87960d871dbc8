"""A rank for the launcher's tests: `python -m rank_behaviour R:ACTION ...` makes rank R sleep, hang (ignoring
SIGTERM), or exit with a status; ranks not named exit 0 at once."""

import os
import signal
import sys
import time

rank = os.environ["RANK"]
actions = dict(arg.split(":") for arg in sys.argv[1:])
action = actions.get(rank, "0")
if action == "hang":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(600)
elif action == "sleep":
    time.sleep(600)
sys.exit(int(action) if action.isdigit() else 0)
