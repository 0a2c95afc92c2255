"""``cytofm-visualize``: attention maps, MIL heatmaps and embedding maps as PNG files."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from cytofm.cli.output_folder import make_output_folder
from cytofm.data.decode import ImageDecodeError
from cytofm.utils.logging import setup_logging

logger = logging.getLogger(__name__)

LOG_NAME = "visualize.log"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def _share(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a share in (0, 1], got {text}")
    return value


def _optional_size(text: str) -> int | None:
    if text.lower() in ("0", "none"):
        return None
    return _positive_int(text)


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output folder for PNGs and log")
    parser.add_argument("--dpi", type=_positive_int, default=100, help="PNG resolution")


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``cytofm-visualize`` and its three subcommands."""
    parser = argparse.ArgumentParser(
        prog="cytofm-visualize",
        description=(
            "Draw figures as PNG files: ViT self-attention per head (attention), ABMIL "
            "attention over a bag's image (mil), and 2-D maps of extracted features "
            f"(embeddings). Each writes a {LOG_NAME} listing the files to its --out folder."
        ),
    )
    commands = parser.add_subparsers(dest="command", required=True)

    attention = commands.add_parser(
        "attention",
        help="last-block CLS-to-patch attention of a backbone, per head",
        description=(
            "For each image, draw the last block's CLS-to-patch attention of every head over "
            "the image, and the image with everything outside the patches holding --share of "
            "the attention mass dimmed."
        ),
    )
    attention.add_argument("images", nargs="+", help="image files or folders of images")
    attention.add_argument("--checkpoint", required=True, help="backbone checkpoint file")
    attention.add_argument(
        "--share",
        type=_share,
        default=0.6,
        help="share of attention mass kept by the thresholded view (default 0.6)",
    )
    attention.add_argument(
        "--max-size",
        type=_optional_size,
        default=1024,
        help="scale images down so the longer side is at most this many pixels before the "
        "model (default 1024; 0 keeps full size). The last block's attention matrix grows "
        "with the fourth power of this side",
    )
    attention.add_argument(
        "--fit",
        choices=("resize", "pad"),
        default="resize",
        help="reach a multiple of the patch size by resizing to the nearest multiple "
        "(default) or by padding bottom and right",
    )
    attention.add_argument(
        "--arch", help="preset name for the number of heads; must match the checkpoint width"
    )
    attention.add_argument("--num-heads", type=_positive_int, help="number of attention heads")
    attention.add_argument("--which", choices=("teacher", "student"), default="teacher")
    attention.add_argument(
        "--trust-pickle", action="store_true", help="allow unrestricted unpickling"
    )
    attention.add_argument("--device", default="cpu", help="torch device, e.g. cuda:0")
    _add_common(attention)

    mil = commands.add_parser(
        "mil",
        help="ABMIL attention of one bag over its source image",
        description=(
            "Draw a bag's ABMIL attention at the boxes of its tiles or cells over the source "
            "image, and a page of its highest- and lowest-attention tiles."
        ),
    )
    mil.add_argument("--run", type=Path, required=True, help="output folder of cytofm-eval-mil")
    mil.add_argument("--bag", required=True, help="bag id as in the feature index")
    source = mil.add_mutually_exclusive_group()
    source.add_argument(
        "--image",
        type=Path,
        help="source image of the bag (default: found through the run's config and the "
        "feature set's meta.json)",
    )
    source.add_argument(
        "--image-root",
        type=Path,
        help="folder holding <bag id> or <bag id>.png/.jpg/... (e.g. the demo set's images/)",
    )
    mil.add_argument("--feature-set", help="feature set name, if the run compares several")
    mil.add_argument("--head", default="abmil", help="MIL head folder name (default abmil)")
    mil.add_argument("--seed", type=int, help="cross-validation seed, if the run has several")
    mil.add_argument(
        "--scale",
        choices=("raw", "percentile"),
        default="raw",
        help="heatmap colours from raw attention weights or their percentile in the bag",
    )
    mil.add_argument(
        "--tiles",
        type=_positive_int,
        default=8,
        help="number of highest and of lowest tiles to show (default 8)",
    )
    mil.add_argument(
        "--max-size",
        type=_optional_size,
        default=2048,
        help="scale the image down to this longer side for drawing (default 2048; 0 keeps it)",
    )
    _add_common(mil)

    embeddings = commands.add_parser(
        "embeddings",
        help="2-D maps of extracted features coloured by label, one panel per feature set",
        description=(
            "Project each feature set to 2-D (UMAP if umap-learn is installed, else t-SNE) "
            "and draw the panels side by side, coloured by bag label."
        ),
    )
    embeddings.add_argument(
        "feature_sets", nargs="+", type=Path, help="feature set folders from cytofm-extract"
    )
    embeddings.add_argument("--names", nargs="+", help="panel titles, one per feature set")
    embeddings.add_argument(
        "--method", choices=("auto", "tsne", "umap", "pca"), default="auto", help="projection"
    )
    embeddings.add_argument(
        "--level",
        choices=("bag", "instance"),
        default="bag",
        help="one point per bag (mean of its instances) or per instance",
    )
    embeddings.add_argument(
        "--max-points",
        type=_optional_size,
        default=5000,
        help="random subsample per feature set above this many points (default 5000; 0: all)",
    )
    embeddings.add_argument("--seed", type=int, default=0, help="seed of subsample and map")
    embeddings.add_argument(
        "--threads", type=_positive_int, help="limit BLAS/OpenMP threads of the projection"
    )
    _add_common(embeddings)
    return parser


def run_command(args: argparse.Namespace) -> list[Path]:
    """Run the chosen subcommand; returns the written files."""
    if args.command == "attention":
        from cytofm.visualize.attention import run_attention

        return run_attention(
            args.checkpoint,
            args.images,
            args.out,
            share=args.share,
            max_size=args.max_size,
            fit=args.fit,
            arch=args.arch,
            num_heads=args.num_heads,
            which=args.which,
            trust_pickle=args.trust_pickle,
            device=args.device,
            dpi=args.dpi,
        )
    if args.command == "mil":
        from cytofm.visualize.mil import run_mil

        return run_mil(
            args.run,
            args.bag,
            args.out,
            image=args.image,
            image_root=args.image_root,
            feature_set=args.feature_set,
            head=args.head,
            seed=args.seed,
            scale=args.scale,
            tiles=args.tiles,
            max_size=args.max_size,
            dpi=args.dpi,
        )
    from cytofm.visualize.embeddings import run_embeddings

    return run_embeddings(
        args.feature_sets,
        args.out,
        names=args.names,
        method=args.method,
        level=args.level,
        max_points=args.max_points,
        seed=args.seed,
        threads=args.threads,
        dpi=args.dpi,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse arguments, draw the figures and return the process exit code (0, or 1 on error)."""
    args = build_parser().parse_args(argv)
    try:
        make_output_folder(args.out)
        setup_logging(args.out / LOG_NAME)
    except OSError as error:
        sys.stderr.write(f"cytofm-visualize: {error}\n")
        return 1
    try:
        written = run_command(args)
    except (OSError, ValueError, LookupError, ImportError, ImageDecodeError) as error:
        logger.error("cytofm-visualize %s failed: %s", args.command, error)
        return 1
    logger.info("%s: wrote %d file(s) to %s", args.command, len(written), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
