"""One rank of a torchrun job in tests/test_ddp.py: ``lg.train`` on a saved system, as a user's script would call
it in each process. It also writes, for the test to check, ``REPORT/rank-<RANK>.json``: the log ``train``
returned and the folders this rank wrote.

Usage: ``train_rank.py SYSTEM DATA CONFIG_JSON OUTPUT REPORT [RESUME]``
"""

import json
import os
import sys
from pathlib import Path

import latentgraph as lg
import latentgraph.training.loop
from latentgraph.training.data import load_training_data
from latentgraph.training.loop import TrainConfig, train

system_dir, data, config, output, report, *resume = sys.argv[1:]
written = []
real_write = latentgraph.training.loop.write_directory


def recorded_write(target, files):
    written.append(str(target))
    return real_write(target, files)


latentgraph.training.loop.write_directory = recorded_write
log = train(lg.load(system_dir), load_training_data(data), TrainConfig(**json.loads(Path(config).read_text())),
            output=output, resume=resume[0] if resume else None, progress=False)
(Path(report) / f"rank-{os.environ['RANK']}.json").write_text(json.dumps({"log": log, "written": written}))
