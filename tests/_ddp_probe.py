"""``torchrun ... tests/_ddp_probe.py OUT train ARGS``: the CLI under torchrun, then each rank's view of what it
trained saved to ``OUT/rank<r>.pt`` (test_distributed.py reads them): the model's state after the last step and
what DDP bucketed for the gradient all-reduce. Only rank 0 writes a run directory, so rank 1's weights are seen
nowhere else.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from perceptual_diffusion import cli
from perceptual_diffusion.runtime import distributed
from perceptual_diffusion.training import loop


def main() -> int:
    out, args = Path(sys.argv[1]), sys.argv[2:]
    built = []
    build = loop._build

    def recording(*a, **k):  # the training loop's own build, recorded
        built.append(build(*a, **k))
        return built[-1]

    loop._build = recording
    code = cli.main(args)
    (trainee,) = built
    ddp = trainee.train_model
    logged = ddp._get_ddp_logging_data()  # DDP's own account of its reducer (a prototype interface)
    state = {k: v.detach().clone() for k, v in trainee.model.state_dict().items()}
    report = {
        "code": code,
        "wrapper": type(ddp).__name__,
        "bucketed_tensors": logged["num_parameter_tensors"],
        "bucketed_bytes": logged["total_parameter_size_bytes"],
        "state": state,
    }
    torch.save(report, out / f"rank{distributed.launched_rank()}.pt")
    return code


if __name__ == "__main__":
    sys.exit(main())
