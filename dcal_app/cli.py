"""Command line (argparse lives here only):

  dcal train --preset NAME --out DIR [--seed N] [--set key=value ...] [--resume]
  dcal eval --checkpoint FILE [--set key=value ...]
  dcal make-dataset --format cub --out DIR [--seed N] [--set synthetic.key=value ...]
  dcal pretrain [--out DIR]       the project's own small backbone (dcal/assets)
  dcal demo [--out DIR]           fine-tune the demo preset, print the numbers, write the doctor's report
  dcal doctor PATH [--format FORMAT] [--num-classes C]
              [--map CANONICAL=NAME ...] [--steps-per-epoch N] [--backbone B --img-size N --batch-size N]
              [--json] [--html FILE]   a run folder or any training log (HF, Lightning, timm, DeiT, OpenMMLab,
              Keras, notebook output, TensorBoard, text, CSV, JSON lines); `dcal doctor -h`: formats, exit codes
  dcal memory --preset NAME [--set key=value ...] [--precision fp32|fp16|bf16] [--gpu-memory GiB] [--json]
  dcal memory --model TIMM_NAME --img-size PX --batch-size B [--num-classes C] [--dcal|--no-dcal]
              [--optimizer adamw|adam|sgd] [--grad-accum N] [--checkpointing] [--precision ...] [--gpu-memory GiB]
              predict a training step's GPU memory from shapes (meta tensors): will it fit?

Multi-GPU / multi-node: `torchrun --nproc_per_node N -m dcal_app train ...`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

__all__ = ["main"]

_DCAL_ASSETS = Path(__file__).resolve().parent.parent / "dcal" / "assets"  # the installed dcal package's


def _callbacks(with_diagnostics: bool) -> list:
    """The diagnostics callbacks a CLI run attaches (`dcal_app.default_callbacks`; dcal never imports them)."""
    if not with_diagnostics:
        return []
    from .callbacks import default_callbacks

    return default_callbacks()


def _config(args) -> Config:  # noqa: F821
    from dcal.config import apply_overrides, preset

    cfg = preset(args.preset)
    if args.seed is not None:
        cfg.train.seed = args.seed
        if cfg.data.format == "synthetic" and "seed" not in cfg.data.synthetic:
            cfg.data.synthetic["seed"] = args.seed
    return apply_overrides(cfg, args.set or [])


def cmd_train(args) -> int:
    from dcal.config import validate
    from dcal.distributed import teardown_distributed
    from dcal.train import build_trainer

    cfg = _config(args)
    validate(cfg)
    try:
        trainer = build_trainer(cfg, args.out, callbacks=_callbacks(not args.no_diagnostics), resume=args.resume)
        trainer.fit()
    finally:
        teardown_distributed()  # torchrun: destroy the process group, also when the run failed
    if trainer.rank == 0:
        print(json.dumps(trainer.last_eval))
    return 0


def cmd_eval(args) -> int:
    import torch

    from dcal.config import apply_overrides
    from dcal.train import (
        build_datasets,
        config_of_checkpoint,
        evaluate,
        load_checkpoint,
        model_from_config,
        normalisation,
    )

    ckpt = load_checkpoint(args.checkpoint)
    cfg = apply_overrides(config_of_checkpoint(ckpt), args.set or [])
    cfg.model.pretrained = False  # the checkpoint holds every weight
    _, test_ds, num_classes = build_datasets(cfg, *normalisation(cfg.model.backbone))
    model = model_from_config(cfg, num_classes)
    model.load_state_dict(ckpt["model"])
    loader = torch.utils.data.DataLoader(test_ds, batch_size=64)
    res, _ = evaluate(model, loader, torch.device("cpu"))
    print(json.dumps({"checkpoint": str(args.checkpoint), "step": ckpt["step"], **res}))
    return 0


def cmd_make_dataset(args) -> int:
    from dcal import data as D
    from dcal.schema import parse_scalar

    fields = {"seed": args.seed}
    for item in args.set or []:
        k, _, v = item.partition("=")
        fields[k.removeprefix("synthetic.")] = parse_scalar(v)
    spec = D.SyntheticSpec(**fields)
    syn = D.load_or_generate(spec, args.cache_dir)
    if args.format != "cub":
        raise SystemExit(f"dcal make-dataset: --format {args.format!r} is not supported (use cub)")
    D.write_cub(syn, args.out)
    print(f"wrote {len(syn.labels)} images, {len(syn.class_names)} classes in CUB-200-2011 layout to {args.out}")
    return 0


def cmd_pretrain(args) -> int:
    from dcal.pretrain import pretrain

    pretrain(Path(args.out), progress=not args.no_progress)
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(Path(args.out), args.set or [])


def cmd_doctor(args) -> int:
    from .doctor import main as doctor_main

    return doctor_main(args.rest)


def cmd_memory(args) -> int:
    from .memory import run as memory_run

    return memory_run(args)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["doctor"]:  # its own parser (`dcal doctor -h`), exit codes 0-3 and no torch (dcal.data has it)
        return cmd_doctor(argparse.Namespace(rest=argv[1:]))
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog="dcal", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train DCAL (or an ablation) from a preset")
    p.add_argument("--preset", required=True)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--no-diagnostics", action="store_true", help="attach no diagnostics callbacks")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="evaluate a checkpoint, print JSON")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("make-dataset", help="write the embedded benchmark to disk")
    p.add_argument("--format", default="cub")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="SyntheticSpec field, e.g. num_classes=10")
    p.set_defaults(fn=cmd_make_dataset)

    p = sub.add_parser("pretrain", help="pre-train the project's small backbone on the pretrain task")
    p.add_argument("--out", default=str(_DCAL_ASSETS))
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(fn=cmd_pretrain)

    p = sub.add_parser("demo", help="fine-tune the demo preset on CPU and print the numbers")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a demo config field")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("doctor", help="diagnose a run folder or any training log", add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(fn=cmd_doctor)

    p = sub.add_parser("memory", help="predict a training step's GPU memory from shapes (will it fit?)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--preset", help="the run a preset describes (the trainer's model, loss, optimiser)")
    what.add_argument("--model", metavar="TIMM_NAME", help="any timm model (with --img-size, --batch-size)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="--preset: override a config field")
    p.add_argument("--img-size", type=int, help="--model: square input side in pixels")
    p.add_argument("--batch-size", type=int, help="--model: micro-batch")
    p.add_argument("--dcal", action=argparse.BooleanOptionalAction, default=True,
                   help="--model: DCAL on the ViT (default) or the plain timm model (--no-dcal)")
    p.add_argument("--optimizer", choices=("adamw", "adam", "sgd"), default="adamw", help="--model (sgd: momentum)")
    p.add_argument("--grad-accum", type=int, default=1, metavar="N", help="--model: micro-batches per step")
    p.add_argument("--checkpointing", action="store_true", help="--model: gradient checkpointing")
    p.add_argument("--precision", choices=("fp32", "fp16", "bf16"), help="default: the config's train.amp (fp32)")
    p.add_argument("--gpu-memory", type=float, metavar="GiB", help="the GPU's memory: does it fit, largest batch")
    p.add_argument("--sm", type=int, default=8, metavar="MAJOR", help="GPU compute capability major (sizes cuBLASLt)")
    p.add_argument("--num-classes", type=int, help="default: 200 for cub and --model, the spec's for synthetic")
    p.add_argument("--target", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(fn=cmd_memory)

    args = parser.parse_args(argv)
    from dcal.data.errors import DatasetError
    from dcal.errors import CheckpointError, ConfigError

    start = time.perf_counter()
    try:
        return args.fn(args)
    except (ConfigError, CheckpointError, DatasetError) as e:
        print(f"dcal {args.command}: error: {e}", file=sys.stderr)
        return 2
    finally:
        logging.getLogger("dcal").debug("%s took %.1fs", args.command, time.perf_counter() - start)


if __name__ == "__main__":
    sys.exit(main())
