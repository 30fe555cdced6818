"""The ``evalserve`` command line: ``evalserve serve`` starts the HTTP server; ``evaluate``,
``predict``, ``bench`` and ``agreement`` are the tools around it. With no command it prints
help."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from app import __version__
from app.client import DEFAULT_URL
from app.config import Settings, UnknownSetting
from app.model.repository import ModelConfigError, discover
from app.preprocessing import ImageError
from app.tools.agreement import CANDIDATES
from app.values import RUNTIMES


def _serve_parser(subparsers: Any) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="start the HTTP server",
        description="Start the HTTP server. Options override EVALSERVE_* environment variables.",
    )
    serve.add_argument("--host", help="address to bind (EVALSERVE_HOST)")
    serve.add_argument("--port", type=int, help="port to bind (EVALSERVE_PORT)")
    serve.add_argument("--model-repository", help="folder of models (EVALSERVE_MODEL_REPOSITORY)")
    serve.add_argument("--default-model", help="model of /v1/predict (EVALSERVE_DEFAULT_MODEL)")
    serve.add_argument("--device", help="auto, cpu, cuda or cuda:N (EVALSERVE_DEVICE)")
    serve.add_argument(
        "--log-level",
        choices=["critical", "error", "warning", "info", "debug"],
        help="log level (EVALSERVE_LOG_LEVEL)",
    )


def _evaluate_parser(subparsers: Any) -> None:
    evaluate = subparsers.add_parser(
        "evaluate",
        help="accuracy of a model over a labelled image folder",
        description="Top-1/top-5 and per-class accuracy over DATA_DIR (ImageFolder layout: one "
        "folder per class, named by the model's labels). In process by default; with --url, "
        "through a running server.",
    )
    evaluate.add_argument("data_dir", type=Path, metavar="DATA_DIR")
    evaluate.add_argument("--model", help="model name (default: EVALSERVE_DEFAULT_MODEL)")
    evaluate.add_argument("--url", help="evaluate through the server at this URL")
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON")
    evaluate.add_argument("--batch-size", type=int, default=64, help="in process (default 64)")
    evaluate.add_argument(
        "--workers", type=int, default=0, help="DataLoader worker processes, in process"
    )
    evaluate.add_argument(
        "--concurrency", type=int, default=8, help="requests in flight with --url (default 8)"
    )
    evaluate.add_argument("--model-repository", help="folder of models, in process")
    evaluate.add_argument("--device", help="auto, cpu, cuda or cuda:N, in process")


def _predict_parser(subparsers: Any) -> None:
    predict = subparsers.add_parser(
        "predict",
        help="classify images with a running server",
        description="Send each IMAGE to a running evalserve and print its top classes.",
    )
    predict.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    predict.add_argument("--url", default=DEFAULT_URL, help=f"server URL (default {DEFAULT_URL})")
    predict.add_argument("--model", help="model name (default: the server's default model)")
    predict.add_argument("--top-k", type=int, help="classes per image (default: the server's)")
    predict.add_argument("--json", action="store_true", help="print the results as JSON")


def _bench_parser(subparsers: Any) -> None:
    bench = subparsers.add_parser(
        "bench",
        help="served throughput and latency against the in-process limit",
        description="Start a server (or use --url), load it at each concurrency, measure the "
        "in-process limit of the same model and preprocessing, and write JSON and a PNG plot.",
    )
    bench.add_argument("--model", help="model name (default: EVALSERVE_DEFAULT_MODEL)")
    bench.add_argument("--url", help="benchmark this running server instead of starting one")
    bench.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 4, 16, 64], help="clients per level"
    )
    bench.add_argument("--seconds", type=float, default=15.0, help="per level (default 15)")
    bench.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="for all models")
    bench.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile every model (default: model.toml's)",
    )
    bench.add_argument(
        "--runtime",
        choices=RUNTIMES,
        help="what runs every model (default: model.toml's)",
    )
    bench.add_argument(
        "--peer-limit",
        action="store_true",
        help="also measure every other installed runtime in process, and report the fastest",
    )
    bench.add_argument("--api-key", help="bearer key, when the server requires one")
    bench.add_argument(
        "--protocol",
        choices=["http", "grpc"],
        default="http",
        help="how the clients speak: POST /v1 (default) or gRPC ModelInfer",
    )
    bench.add_argument(
        "--grpc-target", help="host:port of the gRPC server with --url (default: port 8001)"
    )
    bench.add_argument(
        "--null-model",
        action="store_true",
        help="benchmark a model whose forward pass does next to nothing, with the decode and "
        "preprocessing of --model (default: the default model): the front end's limit. With "
        "--url, the server's model 'null' (python -m app.tools.null_model DIR writes it)",
    )
    bench.add_argument("--out", type=Path, default=Path("bench/results"), help="where results go")


def _agreement_parser(subparsers: Any) -> None:
    agreement = subparsers.add_parser(
        "agreement",
        help="top-1 agreement of a reduced precision, an exported runtime or GPU decode with "
        "torch fp32 on the CPU path",
        description="Run a model with torch in fp32 and as CANDIDATE (a precision, an "
        "exported runtime, or gpu_decode: the same JPEGs decoded on the model's device instead "
        "of by Pillow) over the shipped photographs and their crops (448 images), or over "
        "--images, and report how often the top-1 class agrees and how far the logits differ.",
    )
    agreement.add_argument(
        "candidate",
        metavar="CANDIDATE",
        choices=CANDIDATES,
        help=", ".join(CANDIDATES),
    )
    agreement.add_argument(
        "--images", type=Path, help="compare on every image under this folder instead"
    )
    agreement.add_argument("--model", help="model name (default: EVALSERVE_DEFAULT_MODEL)")
    agreement.add_argument("--model-repository", help="folder of models")
    agreement.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    agreement.add_argument("--json", action="store_true", help="print the result as JSON")


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {
        key: value
        for key in ("host", "port", "model_repository", "default_model", "device", "log_level")
        if (value := getattr(args, key, None)) is not None
    }
    return Settings(**overrides)


def serve(settings: Settings) -> int:
    # Check the repository's files before anything heavy, so a typo fails in one line.
    try:
        specs = discover(settings.model_repository, settings.default_model)
    except ModelConfigError as exc:
        print(f"evalserve: cannot start: {exc}", file=sys.stderr)
        return 2
    if settings.default_model not in specs:
        print(
            f"evalserve: cannot start: the default model {settings.default_model!r} is not in "
            f"the repository {str(settings.model_repository)!r} (found: {', '.join(specs)})",
            file=sys.stderr,
        )
        return 2
    from app.server import run

    return run(settings)


def evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from app.client import Client, EvalserveError
    from app.model.repository import load_spec
    from app.tools import evaluate as ev

    model = args.model or settings.default_model
    try:
        if args.url:
            with Client(args.url) as client:
                labels: Sequence[str] = client.labels(model)
        else:
            labels = load_spec(settings.model_repository / model).labels
        samples = ev.scan(args.data_dir, labels)
    except (ev.DatasetError, ModelConfigError, EvalserveError, httpx.TransportError) as exc:
        print(f"evalserve evaluate: {exc}", file=sys.stderr)
        return 2
    # The bar goes to stderr, only on a terminal, and only once a run has lasted a second.
    retried = None
    with tqdm(total=len(samples), unit="img", delay=1.0, disable=None, leave=False) as bar:
        if args.url:
            outcomes, seconds, retried = ev.evaluate_remote(
                args.url, model, samples, concurrency=args.concurrency, progress=bar.update
            )
            source = args.url
        else:
            outcomes, seconds = ev.evaluate_in_process(
                settings.model_repository / model,
                samples,
                device=settings.device,
                batch_size=args.batch_size,
                workers=args.workers,
                torch_threads=settings.torch_threads,
                max_image_pixels=settings.max_image_pixels,
                progress=bar.update,
            )
            source = "in process"
    report = ev.summarize(model, source, outcomes, seconds, retried)
    print(json.dumps(report.to_dict(), indent=2) if args.json else ev.format_report(report))
    return 0


def predict(args: argparse.Namespace) -> int:
    from app.client import Client, EvalserveError

    results: list[dict[str, Any]] = []
    failed = 0
    with Client(args.url) as client:
        for path in args.images:
            try:
                prediction = client.predict(path, args.top_k, model=args.model)
            except (EvalserveError, OSError, httpx.TransportError) as exc:
                failed += 1
                results.append({"file": str(path), "error": str(exc)})
                if not args.json:
                    print(f"{path}\n  error: {exc}\n", file=sys.stderr)
                continue
            classes = [c.model_dump() for c in prediction.classes]
            results.append({"file": str(path), "classes": classes})
            if not args.json:
                print(str(path))
                for entry in prediction.classes:
                    print(f"  {entry.label[:40]:<40} {entry.score:8.4f}")
                print()
    if args.json:
        print(json.dumps(results, indent=2))
    return 1 if failed else 0


def agreement(args: argparse.Namespace, settings: Settings) -> int:
    from app.tools import agreement

    try:
        images = (
            agreement.folder_images(args.images, settings.max_image_pixels) if args.images else None
        )
        found = agreement.measure(
            settings.model_repository,
            args.model or settings.default_model,
            args.candidate,
            settings.device,
            images=images,
        )
    except (ModelConfigError, FileNotFoundError, ImageError) as exc:
        print(f"evalserve agreement: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(asdict(found), indent=2))
        return 0
    line = (
        f"{found.model} {found.candidate} vs "
        + ("the CPU's decoding" if found.candidate == "gpu_decode" else "torch fp32")
        + f" on {found.device}: top-1 agreement "
        f"{found.top1_agreement:.2%} over {found.images} images (95% interval "
        f"{found.top1_agreement_95ci[0]:.2%} to {found.top1_agreement_95ci[1]:.2%}); "
        f"largest top-1 score change {found.max_top1_score_change:.4f}; "
    )
    if found.top1_agreement < 1:
        line += f"every flip had fp32's top two classes within {found.largest_flipped_margin:.4f}; "
    print(
        line + f"largest logit difference {found.max_logit_difference:.2e} "
        f"({found.max_logit_difference_relative:.2e} of the largest logit)"
    )
    return 0


def bench(args: argparse.Namespace) -> int:
    from app.tools import bench

    result = bench.run(
        model=args.model,
        url=args.url,
        concurrency=args.concurrency,
        seconds=args.seconds,
        out=args.out,
        precision=args.precision,
        compile=args.compile,
        runtime=args.runtime,
        peer_limit=args.peer_limit,
        api_key=args.api_key,
        protocol=args.protocol,
        grpc_target=args.grpc_target,
        null_model=args.null_model,
    )
    print(bench.format_result(result))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="evalserve",
        description="Inference REST microservice for PyTorch image classifiers. "
        "`evalserve serve` starts the server; settings come from EVALSERVE_* environment "
        "variables (see the README).",
    )
    parser.add_argument("--version", action="version", version=f"evalserve {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _serve_parser(subparsers)
    _evaluate_parser(subparsers)
    _predict_parser(subparsers)
    _bench_parser(subparsers)
    _agreement_parser(subparsers)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.command is None:
        parser.print_help()
        return 2
    try:
        settings = _settings(args)
    except UnknownSetting as exc:
        print(f"evalserve: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        print(f"evalserve: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    commands = {
        "serve": lambda: serve(settings),
        "evaluate": lambda: evaluate(args, settings),
        "predict": lambda: predict(args),
        "agreement": lambda: agreement(args, settings),
        "bench": lambda: bench(args),
    }
    return commands[args.command]()
