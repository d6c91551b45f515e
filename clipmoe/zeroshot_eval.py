"""`zeroshot_eval`: a clipmoe (or open_clip-format) model on zero-shot benchmarks, through the `zeroshot`
package's registry, classifier and metrics; the `clipmoe zeroshot` command and training's evaluation
call it."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional, Sequence, Union

import zeroshot

from .device import check_model_device, resolve_device
from .encode import resolve_model
from .errors import ClipmoeError, error_line, make_folder
from .factory import create_model, create_transforms, get_tokenizer
from .model import CLIP
from .plots import plot_zeroshot


def _model(model: Union[str, Path, CLIP], pretrained: Optional[str], device: Optional[str]) -> CLIP:
    if isinstance(model, CLIP):
        check_model_device(model, device)
        return model
    device = str(resolve_device(device))
    path = Path(str(model))
    if path.suffix == ".safetensors" or path.is_file() or path.is_dir():  # a dir: a training checkpoint
        return resolve_model(model, device)
    return create_model(str(model), pretrained=pretrained).to(device)


def zeroshot_eval(model: Union[str, Path, CLIP], datasets: Sequence[str], data_root: Union[str, Path], *,
                  pretrained: Optional[str] = None, out: Union[str, Path, None] = None, split: str = "test",
                  batch_size: int = 64, num_workers: int = 0, device: Optional[str] = None,
                  cache_dir: Union[str, Path, None] = None, classnames_file: Optional[str] = None,
                  templates_file: Optional[str] = None, progress: bool = True) -> list[dict]:
    """Zero-shot metrics of `model` on each dataset (a `zeroshot.list_datasets()` name, or "folder" for a
    class-per-folder tree at `data_root`). A dataset that cannot be opened gets an `error` entry and the
    others still run. With `out`, writes the results as JSON (metrics, dataset, model, templates) and a bar
    chart of each dataset's main metric beside it (same name, .png)."""
    for flag, path, read in (("classnames_file", classnames_file, zeroshot.read_classnames),
                             ("templates_file", templates_file, zeroshot.read_templates)):
        if path is not None:  # once here, not as the same error for every dataset
            try:
                read(path)
            except (OSError, ValueError) as e:
                why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                raise ClipmoeError(f"{flag}: {why if str(path) in why else f'{path}: {why}'}") from None
    if out:  # before the evaluation, which its results would otherwise be lost with
        make_folder(Path(out).parent, "out")
    clip = _model(model, pretrained, device)
    model_device = next(clip.parameters()).device
    _, transform = create_transforms(clip.config)
    tokenizer = get_tokenizer(clip)
    model_key = zeroshot.fingerprint(clip) if cache_dir else None
    name = str(model) if not isinstance(model, CLIP) else "model"
    results = []
    was_training = clip.training
    clip.eval()
    try:
        for ds_name in datasets:
            start = time.perf_counter()
            try:
                ds = zeroshot.open_dataset(ds_name, data_root, transform, split=split,
                                           classnames_file=classnames_file, templates_file=templates_file)
                res = zeroshot.evaluate(ds, clip.encode_image, clip.encode_text, tokenizer, batch_size=batch_size,
                                        num_workers=num_workers, device=model_device, cache_dir=cache_dir,
                                        model_key=model_key, progress=progress)
            except (zeroshot.DatasetNotFound, zeroshot.UnknownDataset) as e:
                res = {"dataset": ds_name, "error": str(e)}
            except Exception as e:  # a broken file mid-run: this dataset fails, the others still run
                res = {"dataset": ds_name, "error": error_line(e)}
            res.update(model=name, pretrained=pretrained, split=split, seconds=round(time.perf_counter() - start, 2))
            results.append(res)
    finally:
        clip.train(was_training)  # a model in training goes on training as it was
    if out:
        Path(out).write_text(json.dumps(results, indent=2))
        if any("metrics" in r for r in results):
            plot_zeroshot(results, Path(out).with_suffix(".png"))
    return results


def check_datasets(names: Sequence[str], data_root: Union[str, Path], split: str = "test") -> None:
    """One error naming every dataset of `names` that cannot be opened under `data_root` (unknown, or no local
    copy): what training checks before its first step rather than at its first evaluation."""
    failed = []
    for name in names:
        try:
            zeroshot.open_dataset(name, data_root, split=split)
        except (zeroshot.DatasetNotFound, zeroshot.UnknownDataset, OSError, ValueError) as e:
            failed.append(str(e) if str(e).startswith(name) else f"{name}: {e}")
    if failed:
        raise ClipmoeError(f"{len(failed)} of {len(names)} datasets cannot be opened: {'; '.join(failed)}")


def format_results(results: list[dict]) -> str:
    """A results table: one row per dataset, its main metrics in percent."""
    lines = [f"{'dataset':<28} {'task':<14} {'metric':<26} {'value':>7}  samples"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['dataset']:<28} error: {r['error']}")
            continue
        for i, (k, v) in enumerate(r["metrics"].items()):
            shown = "    n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:7.2f}"
            head = (r["dataset"], r["task"]) if i == 0 else ("", "")
            skipped = f" (+{r['num_unreadable']} unreadable, left out)" if r.get("num_unreadable") else ""
            tail = f"  {r['num_samples']}{skipped}" if i == 0 else ""
            lines.append(f"{head[0]:<28} {head[1]:<14} {k:<26} {shown}{tail}")
    return "\n".join(lines)


def require_all(results: list[dict]) -> None:
    failed = [r["dataset"] for r in results if "error" in r]
    if failed:
        raise ClipmoeError(f"{len(failed)} of {len(results)} datasets failed: {', '.join(failed)}")
