"""``explainserve serve`` / ``explainserve stop``: TorchServe and the gateway on loopback.

Local mode only: TorchServe's token authorisation is disabled (with a warning) and every
port listens on 127.0.0.1. State (ports, process ids, logs) lives in ``--run-dir``.
"""

from __future__ import annotations

import json
import shutil
import sys
import zipfile
from pathlib import Path, PurePosixPath

from explainserve.sidecar.local import launch_gateway, wait_serving
from explainserve.sidecar.torchserve import TorchServe, TorchServeConfig, stop_process_group

DEFAULT_RUN_DIR = Path("out/serve")
STATE_FILE = "state.json"


def store_warnings(stores: Path, names: list[str], model_store: Path | None = None) -> list[str]:
    """What a user starting the service should know of the stores ``stores/<name>``: each store
    whose verdict can never be ANOMALOUS for some classes (the gateway logs the same) and, given
    the ``model_store`` of the archives, each store built at another layer, input size or
    normalisation than its archive (which the gateway refuses). A store that does not load is
    left to the gateway, which refuses it with its reason."""
    from explainserve.anomaly import StoreError, load_store
    from explainserve.anomaly.calibration import never_anomalous_warning
    from explainserve.model_archive import read_archive_metadata

    warnings = []
    for name in names:
        try:
            store = load_store(stores / name, verify=False)
        except StoreError:
            continue
        warning = store.calibration and never_anomalous_warning(store.calibration, list(store.meta.class_names))
        if warning:
            warnings.append(f"distribution store of {name}: {warning}")
        archive = model_store / f"{name}.mar" if model_store is not None else None
        if archive is not None and archive.is_file():
            misfits = store.meta.misfits(read_archive_metadata(archive))
            if misfits:
                warnings.append(f"distribution store of {name}: built at {'; '.join(misfits)}, as {archive.name} "
                                f"explains the model: the gateway refuses it (store mismatch); rebuild it with "
                                f"explainserve build-distributions --model {archive}")
    return warnings


def register(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="start TorchServe and the Explain gateway locally (loopback)")
    serve.add_argument("--model-store", type=Path, default=Path("model_store"))
    serve.add_argument("--models", nargs="*", help="archive names in the store (default: every .mar)")
    serve.add_argument("--port", type=int, default=50051, help="public Explain API port")
    serve.add_argument("--metrics-port", type=int, default=9464, help="gateway /metrics port")
    serve.add_argument("--torchserve-grpc-port", type=int, default=7070)
    serve.add_argument("--torchserve-management-port", type=int, default=7071)
    serve.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    serve.add_argument("--stores", type=Path, help="distribution stores to score with, one folder per model name "
                                                   "(build-distributions --out DIR/<name>), instead of those in the archives")
    serve.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for the models")
    serve.set_defaults(func=serve_main)
    stop = subparsers.add_parser("stop", help="stop what `explainserve serve` started")
    stop.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR)
    stop.set_defaults(func=stop_main)


def unpack_stores(model_store: Path, archives: list[str], stores: Path) -> list[str]:
    """Extract ``distribution_store/`` of each ``<name>.mar`` into ``stores/<name>/`` (the
    sidecar's --store-dir, replaced whole); returns the names that shipped a store."""
    from explainserve.model_archive import STORE_FOLDER

    shutil.rmtree(stores, ignore_errors=True)
    stores.mkdir(parents=True)
    shipped = []
    for name in archives:
        with zipfile.ZipFile(model_store / f"{name}.mar") as archive:
            members = [m for m in archive.infolist() if m.filename.startswith(f"{STORE_FOLDER}/") and not m.is_dir()]
            for member in members:
                relative = PurePosixPath(member.filename).relative_to(STORE_FOLDER)
                if ".." in relative.parts:
                    raise ValueError(f"{name}.mar: unsafe path {member.filename!r} in {STORE_FOLDER}/")
                target = stores / name / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as source, open(target, "wb") as out:
                    shutil.copyfileobj(source, out)
        if members:
            shipped.append(name)
    return shipped


def serve_main(args) -> int:
    store = args.model_store.resolve()
    archives = args.models or sorted(p.stem for p in store.glob("*.mar"))
    if not archives:
        raise ValueError(f"--model-store: no .mar archives in {store}; build them with `explainserve archive`")
    state_path = args.run_dir / STATE_FILE
    if state_path.exists():
        raise ValueError(f"--run-dir: {state_path} exists; run `explainserve stop --run-dir {args.run_dir}` first")
    print("WARNING: local mode: TorchServe token authorisation is disabled, the gateway takes no API key and "
          "answers reflection, and all ports are on 127.0.0.1. "
          "Never use this mode outside this machine; the Helm chart keeps authorisation on.", file=sys.stderr)
    torchserve = TorchServe(TorchServeConfig(
        model_store=store, models={name: f"{name}.mar" for name in archives}, workdir=(args.run_dir / "torchserve").resolve(),
        grpc_inference_port=args.torchserve_grpc_port, grpc_management_port=args.torchserve_management_port,
        disable_token_auth=True)).start()
    state = {"torchserve_pid": torchserve.process.pid, "models": archives}
    args.run_dir.mkdir(parents=True, exist_ok=True)
    state_path.write_text(json.dumps(state))
    try:
        torchserve.wait_ready(timeout=args.startup_timeout)
        listen = f"127.0.0.1:{args.port}"
        if args.stores is not None:
            stores = args.stores.resolve()
            shipped = [name for name in archives if (stores / name).is_dir()]
        else:
            stores = (args.run_dir / "stores").resolve()
            shipped = unpack_stores(store, archives, stores)
        missing = sorted(set(archives) - set(shipped))
        if missing:
            print(f"no distribution store for {', '.join(missing)}: "
                  "their answers carry no anomaly verdict", file=sys.stderr)
        for warning in store_warnings(stores, shipped, store):
            print(f"WARNING: {warning}", file=sys.stderr)
        gateway = launch_gateway(listen, torchserve.grpc_target, torchserve.management_target, args.metrics_port,
                                 args.run_dir / "gateway.log", ("--store-dir", str(stores), "--reflection"))
        state.update(gateway_pid=gateway.pid, target=listen, metrics=f"http://127.0.0.1:{args.metrics_port}/metrics")
        state_path.write_text(json.dumps(state))
        wait_serving(listen, timeout=60, process=gateway)
    except Exception:
        stop_main(args)
        raise
    print(f"serving {', '.join(archives)}: Explain API on {listen}, metrics on {state['metrics']}")
    print(f"logs in {args.run_dir}; stop with: explainserve stop --run-dir {args.run_dir}")
    return 0


def stop_main(args) -> int:
    state_path = args.run_dir / STATE_FILE
    if not state_path.exists():
        print(f"nothing to stop: no {state_path}")
        return 0
    state = json.loads(state_path.read_text())
    for name in ("gateway_pid", "torchserve_pid"):
        if name in state and stop_process_group(state[name]):
            print(f"stopped {name.removesuffix('_pid')} (process group {state[name]})")
    state_path.unlink()
    return 0
