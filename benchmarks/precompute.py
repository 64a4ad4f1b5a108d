"""Benchmark: prior precompute throughput, the cost of a fully cached rerun, and cache bytes per image.

Builds a throw-away SKF home (SQLite catalog, local store), ingests ``--images`` synthetic low-light
LOL pairs of ``--height`` x ``--width`` (default 400x600, the LOL size), then runs
:func:`components.precompute.precompute_priors` twice with the HRNet-W48 SKB:

* run 1 computes everything: images/s (wall time incl. image reads and cache writes);
* run 2 must find everything cached: its time, and the number of HRNet forward passes it made,
  counted by a forward pre-hook on the network itself (must be 0);
* bytes per cached image, against the spec's 4,294,800 B of fp16 maps for 600x400.

Without ``--checkpoint`` the SKB is randomly initialised: the speed and sizes are the same as with the
official weights, the priors are meaningless.

The SKB is built with the SKB settings a recipe trains with (``--recipe``: its ``skf.skb_settings``, e.g.
LLFlow-SKF's ``input_transform: log``, ``bn_mode: eval``) and/or ``--skb-setting KEY=VALUE``; they enter the
SKB's fingerprint, so the cache is the one that recipe reads. The cache holds F0/F1/F2 at 1/4, 1/8, 1/16 and
the logits at 1/4 whatever the baseline: LLFlow-SKF's 1/8-resolution condition (``att_block_1``) takes F0,
which its SE block nearest-resizes from 1/4 to 1/8 itself, so no extra 1/8 map is computed or stored.

    python benchmarks/precompute.py                        # CPU, 4 images
    python benchmarks/precompute.py --device cuda --images 32 --batch-size 8
    python benchmarks/precompute.py --skb skb/hrnet-w48-lite@1 --recipe llflow-s-skf --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image


def write_dataset(root: Path, n: int, height: int, width: int, seed: int = 0) -> Path:
    """``n`` random dim/bright pairs in the LOL layout (all in the train split)."""
    rng = np.random.default_rng(seed)
    for role in ("low", "high"):
        (root / "our485" / role).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        high = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        low = (high * rng.uniform(0.05, 0.2)).astype(np.uint8)
        Image.fromarray(low).save(root / "our485" / "low" / f"{i:04d}.png")
        Image.fromarray(high).save(root / "our485" / "high" / f"{i:04d}.png")
    return root


def skb_settings(recipe: str | None, pairs: list[str]) -> dict[str, object]:
    """The SKB builder settings: ``recipe``'s ``skf.skb_settings``, then ``KEY=VALUE`` pairs (YAML values)."""
    import yaml

    from components.skb import SKB_SETTINGS

    settings: dict[str, object] = {}
    if recipe:
        from components.recipes import load_recipe

        settings.update(load_recipe(recipe).skf.skb_settings)
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in SKB_SETTINGS:
            raise SystemExit(
                f"--skb-setting {pair!r}: expected KEY=VALUE with KEY one of {list(SKB_SETTINGS)}"
            )
        settings[key] = yaml.safe_load(value)
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skb", default="skb/hrnet-w48-pascal@1")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--height", type=int, default=400)
    parser.add_argument("--width", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--recipe", default=None, help="build the SKB with this recipe's skf.skb_settings (e.g. llflow-s-skf)"
    )
    parser.add_argument(
        "--skb-setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an SKB builder setting (bn_mode, input_transform, pad_multiple, amp); repeatable, wins over --recipe",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="skf-bench-precompute-"))
    os.environ["SKF_HOME"] = str(home)
    for var in ("SKF_CATALOG_URL", "SKF_STORAGE_URI"):
        os.environ.pop(var, None)
    settings = skb_settings(args.recipe, args.skb_setting)  # after SKF_HOME: imports the components

    import torch

    from components import registry
    from components.catalog import PriorCacheEntry, open_catalog
    from components.data.ingest import ingest
    from components.precompute import precompute_priors
    from components.prior_cache import prior_elements
    from components.skb import SKB_SETTINGS

    if args.threads:
        torch.set_num_threads(args.threads)
    ref = ingest(str(write_dataset(home / "src", args.images, args.height, args.width)), name="bench").ref
    skb = registry.create(args.skb, checkpoint=args.checkpoint, device=args.device, **settings)
    forwards = [0]
    skb.model.register_forward_pre_hook(lambda _m, _inp: forwards.__setitem__(0, forwards[0] + 1))

    first = precompute_priors(ref, skb=skb, batch_size=args.batch_size)
    forwards_first = forwards[0]
    second = precompute_priors(ref, skb=skb, batch_size=args.batch_size)
    forwards_second = forwards[0] - forwards_first

    with open_catalog().session() as session:
        sizes = [e.nbytes for e in session.query(PriorCacheEntry).filter_by(fingerprint=skb.fingerprint)]
    fp16_maps = 2 * prior_elements((args.height, args.width))
    results = {
        "skb": first.skb_spec_resolved,
        "pretrained": first.pretrained,
        "skb_settings": {k: getattr(skb, k) for k in SKB_SETTINGS},
        "skb_settings_from": args.recipe or ("--skb-setting" if args.skb_setting else "defaults"),
        "fingerprint": skb.fingerprint,
        "device": str(skb.device),
        "torch_threads": torch.get_num_threads(),
        "image_size": [args.height, args.width],
        "images": args.images,
        "batch_size": args.batch_size,
        "run1_seconds": round(first.seconds, 3),
        "run1_images_per_s": round(first.images_per_s, 4),
        "run1_forward_passes": forwards_first,
        "run2_seconds": round(second.seconds, 3),
        "run2_cached": second.cached,
        "run2_forward_passes": forwards_second,
        "bytes_per_image": round(sum(sizes) / max(1, len(sizes))),
        "fp16_map_bytes_per_image": fp16_maps,
    }
    print(json.dumps(results, indent=2))
    if not first.pretrained:
        print("note: random-init SKB (no checkpoint): timings and sizes are representative, priors are not")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if forwards_second != 0 or second.cached != args.images or first.failed:
        sys.exit("FAIL: the cached rerun ran the SKB or some image failed")


if __name__ == "__main__":
    main()
