"""One rank of a torchrun job in tests/test_ddp.py, calling ``lg.train`` as a user's script would in each
process: a whole run into ``OUTPUT/whole``, then, in the same process, a run resumed from its step-2 checkpoint
into ``OUTPUT/resumed``, each on the system as saved. For the test to check it writes
``REPORT/rank-<RANK>.json``: the logs ``train`` returned and the folders this rank wrote.

Usage: ``train_rank.py SYSTEM DATA CONFIG_JSON OUTPUT REPORT``
"""

import json
import os
import sys
from pathlib import Path

import latentgraph as lg
import latentgraph.training.loop
from latentgraph.training.data import load_training_data
from latentgraph.training.loop import TrainConfig, train

system, data, config, output, report = map(Path, sys.argv[1:])
examples, config = load_training_data(data), TrainConfig(**json.loads(config.read_text()))
written = []
real_write = latentgraph.training.loop.write_directory


def recorded_write(target, files):
    written.append(str(target))
    return real_write(target, files)


latentgraph.training.loop.write_directory = recorded_write
whole = train(lg.load(system), examples, config, output=output / "whole", progress=False)
resumed = train(lg.load(system), examples, config, output=output / "resumed",
                resume=output / "whole" / "checkpoint-2", progress=False)
(report / f"rank-{os.environ['RANK']}.json").write_text(json.dumps({"whole": whole, "resumed": resumed,
                                                                    "written": written}))
