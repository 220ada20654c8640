"""The `raystack` command line.

    raystack config check FILE...        validate Serve deploy configs (schema, engine args, models)
    raystack models list                 embedded models and what the cache holds
    raystack models prepare SOURCE...    prepare an embedded model or download a hub model into the cache
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raystack.config import ConfigError, load_serve_config


def _config_check(args: argparse.Namespace) -> int:
    from raystack.app import check_deployable
    from raystack.models.sources import default_cache_dir

    failed = 0
    for path in args.files:
        try:
            for app_name, config in load_serve_config(path):
                cache = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
                check_deployable(config, cache)
                summary = ", ".join(
                    f"{m.name} <- {'/'.join(b.name for b in m.backends)}" for m in config.models
                )
                print(f"{path}: OK (application {app_name!r}: {summary})")
        except ConfigError as err:
            print(f"{path}: {err}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def _models_list(args: argparse.Namespace) -> int:
    from raystack.models import embedded, sources

    cache = Path(args.cache_dir) if args.cache_dir else sources.default_cache_dir()
    print(f"cache: {cache}")
    for model_id, model in embedded.EMBEDDED_MODELS.items():
        state = "prepared" if embedded.is_prepared(model, cache, verify=False) else "not prepared"
        print(f"  {model_id:28} embedded ({model.pip_spec}, {model.license})  {state}")
    for kind in ("modelscope", "hf"):
        for done in sorted((cache / kind).glob("*/*/.raystack-complete")):
            ref = done.parent.relative_to(cache / kind)
            print(f"  {kind}://{ref}  downloaded")
    return 0


def _models_prepare(args: argparse.Namespace) -> int:
    from raystack.models import sources

    cache = Path(args.cache_dir) if args.cache_dir else sources.default_cache_dir()
    for source in args.sources:
        try:
            path = sources.resolve(source, cache, progress=print)
        except sources.ModelSourceError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raystack", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    config = sub.add_parser("config", help="deploy configs").add_subparsers(dest="action", required=True)
    check = config.add_parser("check", help="validate Serve YAML files that use raystack.app:build_app")
    check.add_argument("files", nargs="+")
    check.set_defaults(func=_config_check)

    models = sub.add_parser("models", help="model sources and the model cache").add_subparsers(
        dest="action", required=True
    )
    listing = models.add_parser("list", help="embedded models and the cache's contents")
    listing.add_argument("--cache-dir")
    listing.set_defaults(func=_models_list)
    prepare = models.add_parser(
        "prepare", help="embedded id, modelscope://Org/Name or hf://Org/Name into the cache"
    )
    prepare.add_argument("sources", nargs="+")
    prepare.add_argument("--cache-dir", help="default: $RAYSTACK_CACHE_DIR or ~/.cache/raystack")
    prepare.set_defaults(func=_models_prepare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
