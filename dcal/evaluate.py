"""Evaluation: accuracy of SA, GLCA and the fused prediction, and where GLCA's selected tokens land.

Every metric is computed from per-image results over the whole test set. Under torchrun each process
evaluates an unpadded shard (`dcal.distributed.ShardSampler`); the per-image results are gathered with
their dataset indices and put back in dataset order, so a distributed evaluation gives exactly the
one-process numbers (no padded duplicates, hit-rates over every image, not rank 0's shard).
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from .distributed import all_gather_objects, is_distributed
from .errors import ConfigError
from .metrics import chance_hit_rate, hits, patches_in_boxes
from .model import DCAL, eval_mode, fused_probs

__all__ = ["evaluate", "PROBE_KEYS"]

PROBE_KEYS = ("image", "part_box", "distractor_boxes")  # kept for the first `keep_images` images only
_PER_IMAGE = ("index", "label", "correct_sa", "correct_glca", "correct_fused", "loss_sa", "rollout", "local_index",
              "part_mask", "distractor_mask")


@torch.no_grad()
def evaluate(model: DCAL, loader: DataLoader, device: torch.device, *,
             autocast: Callable[[], AbstractContextManager] = nullcontext, keep_images: int = 16) -> tuple[dict, dict]:
    """Evaluate `model` (in eval mode, restored after) on every image of `loader`.

    Args:
        model: the DCAL model (not a DDP wrapper).
        loader: the test loader; under torchrun each process's loader holds its own shard (batches need an
            ``index`` entry, the dataset position, to put the gathered results back in order).
        device: where the forward runs.
        autocast: a context-manager factory around the forward (the trainer's mixed precision).
        keep_images: how many images (the first of the dataset) to return with their boxes.

    Returns:
        (record fields: acc_sa, acc_glca, acc_fused, loss_sa, num_classes, num_images, part_hit,
        part_hit_chance, distractor_hit, part_hit_top1, distractor_hit_top1; outputs over the whole set in
        dataset order: rollout, local_index, label, part_mask, distractor_mask, index, and the first
        `keep_images` images with their part_box and distractor_boxes).
    """
    with eval_mode(model):
        local = _run(model, loader, device, autocast, keep_images)
    results = _in_dataset_order(all_gather_objects(local))
    if not len(results["index"]):
        raise ConfigError("the evaluation set is empty")
    return _metrics(model, results), _outputs(results, keep_images)


def _run(model: DCAL, loader: DataLoader, device: torch.device, autocast, keep_images: int) -> dict[str, list]:
    """Per-image results of this process's batches (CPU tensors, lists of per-batch pieces)."""
    keep: dict[str, list] = {k: [] for k in (*_PER_IMAGE, "probe_index", *PROBE_KEYS)}
    offset = 0
    for batch in loader:
        n = len(batch["label"])
        index = batch.get("index")
        if index is None:
            if is_distributed():
                raise ConfigError("distributed evaluation needs each sample's dataset 'index' in the batch")
            index = torch.arange(offset, offset + n)
        offset += n
        for k, v in _batch_results(model, batch, device, autocast).items():
            keep[k].append(v)
        index = torch.as_tensor(index).long()
        keep["index"].append(index)
        probe = index < keep_images
        keep["probe_index"].append(index[probe])
        for k in PROBE_KEYS:
            if k in batch:
                keep[k].append(batch[k][probe].cpu())
    return {k: v for k, v in keep.items() if v}


def _batch_results(model: DCAL, batch: dict, device: torch.device, autocast) -> dict[str, Tensor]:
    x, y = batch["image"].to(device), batch["label"].to(device)
    with autocast():
        out = model(x)
    sa = out.sa_logits.float()
    res = {"label": y.cpu(), "correct_sa": (sa.argmax(-1) == y).cpu(),
           "correct_fused": (fused_probs(out.sa_logits, out.glca_logits).argmax(-1) == y).cpu(),
           "loss_sa": F.cross_entropy(sa, y, reduction="none").double().cpu(),
           "rollout": out.rollout.float().cpu(), "local_index": out.local_index.cpu()}
    if out.glca_logits is not None:
        res["correct_glca"] = (out.glca_logits.argmax(-1) == y).cpu()
    if "part_box" in batch:
        res["part_mask"] = patches_in_boxes(batch["part_box"], model.grid_size, model.patch_size)
    if "distractor_boxes" in batch and batch["distractor_boxes"].numel():
        res["distractor_mask"] = patches_in_boxes(batch["distractor_boxes"], model.grid_size, model.patch_size)
    return res


def _in_dataset_order(per_rank: list[dict[str, list]]) -> dict[str, Tensor]:
    """Concatenate every rank's results; per-image ones sorted by dataset index, probe images likewise."""
    keys = {k for r in per_rank for k in r}
    cat = {k: torch.cat([t for r in per_rank for t in r.get(k, [])]) for k in keys}
    if "index" not in cat:
        return {"index": torch.zeros(0, dtype=torch.long)}
    order, probe_order = cat["index"].argsort(), cat["probe_index"].argsort()
    out = {k: cat[k][order] for k in _PER_IMAGE if k in cat}
    out.update({k: cat[k][probe_order] for k in PROBE_KEYS if k in cat})
    return out


def _metrics(model: DCAL, r: dict[str, Tensor]) -> dict:
    """The eval record's fields from per-image results over the whole set (sums in float64)."""
    n = len(r["index"])
    res = {"acc_sa": _mean(r["correct_sa"]), "acc_glca": _mean(r["correct_glca"]) if "correct_glca" in r else None,
           "acc_fused": _mean(r["correct_fused"]), "loss_sa": float(r["loss_sa"].sum()) / n,
           "num_classes": model.num_classes, "num_images": n}
    res.update(part_hit=None, part_hit_chance=None, distractor_hit=None, part_hit_top1=None, distractor_hit_top1=None)
    pm, li = r.get("part_mask"), r["local_index"]
    if pm is None or not pm.any(dim=1).all():  # a hit-rate only when every image has a part patch
        return res
    res["part_hit"] = _mean(hits(li, pm))
    res["part_hit_chance"] = chance_hit_rate(pm, li.shape[1])
    # The same for the single highest-scoring patch: with k larger than one mark's patches, the k
    # selected tokens can cover the part *and* a distractor; the top-1 says which one wins.
    res["part_hit_top1"] = _mean(hits(li[:, :1], pm))
    dm = r.get("distractor_mask")
    if dm is not None and dm.any(dim=1).all():
        res["distractor_hit"] = _mean(hits(li, dm))
        res["distractor_hit_top1"] = _mean(hits(li[:, :1], dm))
    return res


def _mean(flags: Tensor) -> float:
    return float(flags.double().sum()) / len(flags)


def _outputs(r: dict[str, Tensor], keep_images: int) -> dict[str, Tensor]:
    """What `trainer.eval_outputs` holds: per-image tensors in dataset order and the probe images."""
    out = {k: r[k] for k in ("rollout", "local_index", "label", "part_mask", "distractor_mask", "index") if k in r}
    out.update({k: r[k][:keep_images] for k in PROBE_KEYS if k in r})
    return out
