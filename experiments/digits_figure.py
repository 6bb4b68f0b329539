"""The README's digits figure: a run's latest one-step, two-step and Heun grids side by side, enlarged.

    python experiments/digits_figure.py RUN_DIR OUT.png [--scale 3]

Reads RUN_DIR/samples/<mode>_<step>.png (written by scgcm.train every --config.sample.sampling-step) at
the latest step that has all three, and writes one PNG with a title over each grid; a fourth grid shows
as many real held-out digits, drawn the same way, to judge the samples against.
"""

import argparse
import re
import sys
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from scgcm.data.digits import load_digits
from scgcm.run.rundir import save_grid

MODES = (("onestep", "one step"), ("twostep", "two steps"), ("heun", "Heun through the score head"))


def latest_common_step(samples: Path) -> int:
    steps = {mode: {int(m.group(1)) for p in samples.glob(f"{mode}_*.png") if (m := re.fullmatch(rf"{mode}_(\d+)", p.stem))}
             for mode, _ in MODES}
    common = set.intersection(*steps.values())
    if not common:
        sys.exit(f"{samples}: no step with a grid of each of {', '.join(m for m, _ in MODES)}")
    return max(common)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--scale", type=int, default=3)
    args = parser.parse_args()
    step = latest_common_step(args.run / "samples")
    grids = [Image.open(args.run / "samples" / f"{mode}_{step:07d}.png").convert("L") for mode, _ in MODES]
    real = args.out.with_name(args.out.stem + ".real.png")
    save_grid(load_digits("test")[0][: round(grids[0].width / 10) ** 2], real)  # 10 px a cell: as many as a sample grid
    grids.append(Image.open(real).convert("L"))
    real.unlink()
    grids = [g.resize((g.width * args.scale, g.height * args.scale), Image.NEAREST) for g in grids]
    pad, head = 10, 20
    sheet = Image.new("L", (sum(g.width for g in grids) + pad * (len(grids) + 1), max(g.height for g in grids) + head + pad),
                      255)
    draw, font, x = ImageDraw.Draw(sheet), ImageFont.load_default(), pad
    titles = [f"{title}, {step:,} updates" for _, title in MODES] + ["real held-out digits"]
    for title, grid in zip(titles, grids):
        draw.text((x + grid.width // 2, head // 2), title, fill=0, font=font, anchor="mm")
        sheet.paste(grid, (x, head))
        x += grid.width + pad
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out} (step {step})")


if __name__ == "__main__":
    main()
