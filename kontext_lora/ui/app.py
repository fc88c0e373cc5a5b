"""The web app: Starlette routes rendering Jinja2 templates, with htmx (vendored in static/) for the live parts.

Every path a request names goes through `Root.resolve` (refused outside --root); nothing here builds a shell
line: runs start from argv lists (runs.py).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from kontext_lora.config import ConfigError
from kontext_lora.run_files import CONFIG_NAME, METRICS_NAME
from kontext_lora.ui import datasets, forms, plots, runs
from kontext_lora.ui.paths import PathRefused, Root

HERE = Path(__file__).parent
DEFAULT_VRAM_GIB = 24.0


def _configs(root: Root) -> list[str]:
    """YAML files under the root that are training configs (not sweep files, not run folders' resolved copies)."""
    found = []
    for folder, dirs, files in root.walk(frozenset({"cache", "validation", "logs", "best", "control", "target"})):
        if (folder / METRICS_NAME).is_file() or folder.name.startswith("step-"):
            dirs.clear()
            continue
        for name in sorted(files):
            if name.endswith((".yaml", ".yml")) and not _is_sweep_file(folder / name):
                found.append(root.relative(folder / name))
    return found


def _is_sweep_file(path: Path) -> bool:
    import yaml

    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(tree, dict) and bool({"grid", "random", "runs", "fixed"} & set(tree)) and "model" not in tree


def create_app(
    root_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None, host: str = "127.0.0.1"
) -> Starlette:
    """The app over `root_dir`; thumbnails are cached in `cache_dir` (default <root>/.kontext-lora-ui)."""
    root = Root(root_dir)
    cache = Path(cache_dir) if cache_dir else root.path / ".kontext-lora-ui"
    processes = runs.Processes(root)
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals.update(urlencode=urlencode)
    templates.env.filters["size"] = lambda n: f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"

    def page(request: Request, name: str, status_code: int = 200, **context) -> HTMLResponse:
        return templates.TemplateResponse(request, name, {"root": root, **context}, status_code=status_code)

    def arg(request: Request, name: str, default: str = "") -> str:
        return request.query_params.get(name, default)

    def index(request: Request) -> HTMLResponse:
        return page(request, "index.html", datasets=datasets.find_datasets(root), configs=_configs(root),
                    runs=[root.relative(p) for p in runs.find_runs(root)],
                    sweeps=[root.relative(p) for p in runs.find_sweeps(root)])  # fmt: skip

    # ------------------------------------------------------------------------------------------------ datasets

    def dataset_settings(values) -> tuple[int, str, list[str]]:
        try:
            resolution = int(values.get("resolution") or 512)
        except ValueError:
            resolution = 512
        buckets = values.get("buckets") or "area"
        if buckets not in ("area", "kontext", "square"):
            buckets = "area"
        controls = [c.strip() for c in (values.get("controls") or "control").split(",") if c.strip()]
        return max(16, resolution - resolution % 16), buckets, controls

    def dataset_list(request: Request) -> HTMLResponse:
        return page(request, "datasets.html", datasets=datasets.find_datasets(root))

    def dataset(request: Request) -> HTMLResponse:
        resolution, buckets, controls = dataset_settings(request.query_params)
        WARMUP.wait_data()
        start = time.perf_counter()
        view = datasets.view_dataset(root, arg(request, "path"), resolution, buckets, controls)
        only_flagged = arg(request, "flagged") == "1"
        rows = [row for row in view.rows if row.flagged] if only_flagged else view.rows
        return page(request, "dataset.html", view=view, rows=rows, resolution=resolution, buckets=buckets,
                    controls=",".join(controls), only_flagged=only_flagged,
                    seconds=time.perf_counter() - start)  # fmt: skip

    async def dataset_edit(request: Request) -> Response:
        form = {key: str(value) for key, value in (await request.form()).items()}
        return await run_in_threadpool(edit_pair, request, form)

    def edit_pair(request: Request, form: dict[str, str]) -> Response:
        WARMUP.wait_data()
        path, stem = form.get("path", ""), form.get("stem", "")
        resolution, buckets, controls = dataset_settings(form)
        action = request.path_params["action"]
        try:
            if action == "caption":
                written = datasets.write_caption(root, path, stem, form.get("caption", ""), controls)
                message = f"saved to {root.relative(written)}"
            elif action == "flag":
                datasets.set_flag(root, path, stem, form.get("flagged") == "1")
                message = ""
            elif action == "drop":
                datasets.drop_pair(root, path, stem, controls)
                return page(request, "_dropped.html", stem=stem, path=path, folder=datasets.DROP_DIR)
            else:
                raise HTTPException(404)
        except datasets.EditRefused as exc:
            return HTMLResponse(f'<div class="error">{exc}</div>', status_code=400)
        view = datasets.view_dataset(root, path, resolution, buckets, controls)
        row = next(r for r in view.rows if r.stem == stem)
        return page(request, "_pair.html", view=view, row=row, message=message, resolution=resolution,
                    buckets=buckets, controls=",".join(controls))  # fmt: skip

    def thumb(request: Request) -> FileResponse:
        WARMUP.wait_data()
        cached = datasets.thumbnail(root, arg(request, "path"), cache)
        return FileResponse(cached, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    # -------------------------------------------------------------------------------------------------- config

    def config_context(path: Path, form: dict[str, str] | None, vram: float, with_plan: bool = True) -> dict:
        values, file_error = forms.file_values(path)
        overrides = forms.overrides_from_form(form, values) if form is not None else []
        error = forms.load_error(path, overrides) if form is not None else file_error
        fields, top_error = forms.fields_for(values, form, error)
        plan = None
        if not error and with_plan:
            WARMUP.wait_planner()
            try:
                plan = forms.plan_for(path, overrides, vram)
            except ConfigError as exc:
                plan = {"error": str(exc), "chosen": None, "rows": []}
        sections: dict[str, list] = {}
        for f in fields:
            sections.setdefault(f.section, []).append(f)
        return {"path": root.relative(path), "sections": sections, "fields": fields, "top_error": top_error,
                "error": error, "overrides": overrides, "plan": plan, "vram": vram,
                "chain": [root.relative(p) for p in forms.extends_chain(path)],
                "item_docs": forms.item_docs()}  # fmt: skip

    def vram_of(values) -> float:
        try:
            return max(1.0, float(values.get("_vram") or DEFAULT_VRAM_GIB))
        except ValueError:
            return DEFAULT_VRAM_GIB

    def config_list(request: Request) -> HTMLResponse:
        return page(request, "configs.html", configs=_configs(root))

    def config(request: Request) -> HTMLResponse:
        path = root.resolve(arg(request, "path"))
        # The plan comes in a request of its own (the page asks once loaded): the first one imports diffusers.
        # The same for every change: a key's error shows at once, the plan follows.
        context = config_context(path, None, vram_of(request.query_params), with_plan=False)
        return page(request, "config.html", **context)

    async def form_of(request: Request) -> tuple[Path, dict[str, str], float]:
        form = await request.form()
        values = {key: str(value) for key, value in form.items()}
        return root.resolve(values.pop("_path", "")), values, vram_of(values)

    async def config_check(request: Request) -> HTMLResponse:
        path, form, vram = await form_of(request)
        context = await run_in_threadpool(config_context, path, form, vram, False)
        return page(request, "_config_check.html", oob=True, **context)

    async def config_plan(request: Request) -> HTMLResponse:
        path, form, vram = await form_of(request)
        context = await run_in_threadpool(config_context, path, form, vram, True)
        return page(request, "_plan.html", **context)

    async def config_save(request: Request) -> HTMLResponse:
        path, form, vram = await form_of(request)
        context = await run_in_threadpool(config_context, path, form, vram, False)
        destination_text = form.get("_save_as", "").strip()
        message = ""
        if context["error"]:
            message = "not saved: fix the error first"
        elif not destination_text.endswith((".yaml", ".yml")):
            message = "not saved: name a .yaml file under the root"
        else:
            destination = root.resolve(destination_text, must_exist=False)
            forms.save_yaml(path, destination, context["overrides"])
            message = f"saved {root.relative(destination)}"
        return page(request, "_config_check.html", oob=True, message=message, **context)

    async def launch(request: Request) -> Response:
        path, form, vram = await form_of(request)
        context = await run_in_threadpool(config_context, path, form, vram, False)
        if context["error"]:
            return page(request, "_config_check.html", oob=True, message="not launched: fix the error first", **context)
        try:
            run_dir = await run_in_threadpool(processes.launch, path, context["overrides"])
        except (ConfigError, runs.LaunchRefused, PathRefused) as exc:
            return page(request, "_config_check.html", oob=True, message=f"not launched: {exc}", **context)
        return Response(headers={"HX-Redirect": "/run?" + urlencode({"path": root.relative(run_dir)})})

    # ---------------------------------------------------------------------------------------------------- runs

    def run_list(request: Request) -> HTMLResponse:
        views = [runs.view_run(root, p, processes) for p in runs.find_runs(root)]
        return page(request, "runs.html", runs=views)

    def run_context(run_dir: Path) -> dict:
        view = runs.view_run(root, run_dir, processes)
        series = {"train loss": view.losses}
        heldout = {"held-out loss": view.heldout}
        return {"run": view, "loss_svg": plots.curves_svg(series), "heldout_svg": plots.curves_svg(heldout)}

    def run(request: Request) -> HTMLResponse:
        return page(request, "run.html", **run_context(runs.run_folder(root, arg(request, "path"))))

    def run_live(request: Request) -> HTMLResponse:
        return page(request, "_run_live.html", **run_context(runs.run_folder(root, arg(request, "path"))))

    async def run_action(request: Request) -> HTMLResponse:
        form = await request.form()
        return await run_in_threadpool(act_on_run, request, str(form.get("path", "")))

    def act_on_run(request: Request, path: str) -> HTMLResponse:
        run_dir = runs.run_folder(root, path)
        message = ""
        try:
            if request.path_params["action"] == "stop":
                processes.stop(run_dir)
                message = "stopping: the checkpoint is written at the next step boundary"
            elif request.path_params["action"] == "resume":
                processes.resume(run_dir)
                message = "resumed with train.resume=latest"
            else:
                raise HTTPException(404)
        except (runs.LaunchRefused, ConfigError) as exc:
            message = str(exc)
        return page(request, "_run_live.html", message=message, **run_context(run_dir))

    def files(request: Request) -> FileResponse:
        path = root.resolve(arg(request, "path"))
        if not path.is_file():
            raise PathRefused(f"{arg(request, 'path')} is not a file")
        if arg(request, "inline") == "1":
            return FileResponse(path)
        return FileResponse(path, filename=path.name)  # Content-Disposition: attachment

    # -------------------------------------------------------------------------------------------------- sweeps

    def sweep_list(request: Request) -> HTMLResponse:
        return page(request, "sweeps.html", sweeps=[root.relative(p) for p in runs.find_sweeps(root)])

    def sweep(request: Request) -> HTMLResponse:
        folder = root.resolve(arg(request, "path"))
        if not (folder / "sweep_summary.csv").is_file():
            raise PathRefused(f"{arg(request, 'path')} has no sweep_summary.csv")
        sort, descending = arg(request, "sort"), arg(request, "desc") == "1"
        columns, rows = runs.read_summary(folder, sort, descending)
        plot = folder / "sweep_loss.png"
        return page(request, "sweep.html", path=root.relative(folder), columns=columns, rows=rows, sort=sort,
                    descending=descending, plot=root.relative(plot) if plot.is_file() else "",
                    run_dirs={row["run"]: root.relative(folder / row["run"]) for row in rows
                              if (folder / row.get("run", "") / CONFIG_NAME).is_file()})  # fmt: skip

    # ---------------------------------------------------------------------------------------------------- errors

    async def refused(request: Request, exc: Exception) -> HTMLResponse:
        return page(request, "error.html", status_code=403, message=str(exc))

    async def bad_data(request: Request, exc: Exception) -> HTMLResponse:
        return page(request, "error.html", status_code=400, message=str(exc))

    routes = [
        Route("/", index),
        Route("/datasets", dataset_list),
        Route("/dataset", dataset),
        Route("/dataset/{action}", dataset_edit, methods=["POST"]),
        Route("/thumb", thumb),
        Route("/configs", config_list),
        Route("/config", config),
        Route("/config/check", config_check, methods=["POST"]),
        Route("/config/save", config_save, methods=["POST"]),
        Route("/config/plan", config_plan, methods=["POST"]),
        Route("/runs", run_list),
        Route("/runs/launch", launch, methods=["POST"]),
        Route("/run", run),
        Route("/run/live", run_live),
        Route("/run/{action}", run_action, methods=["POST"]),
        Route("/files", files),
        Route("/sweeps", sweep_list),
        Route("/sweep", sweep),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    # Only requests addressed to this machine by name are served: a web page elsewhere cannot reach the app by
    # pointing a DNS name at 127.0.0.1 (DNS rebinding).
    allowed = sorted({"127.0.0.1", "localhost", "[::1]", host})
    app = Starlette(
        routes=routes,
        middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=allowed), Middleware(_SameOrigin)],
        exception_handlers={PathRefused: refused, datasets.EditRefused: bad_data},
        lifespan=_stop_runs_on_exit(processes),
    )
    app.state.processes = processes
    return app


class _SameOrigin:
    """Refuse a POST sent by a page of another origin (a form on some web site aimed at this local server): it
    could otherwise launch runs or rewrite captions. Browsers name the sending page's origin on every POST."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = dict(scope["headers"])
            origin = headers.get(b"origin", b"").decode()
            host = headers.get(b"host", b"").decode()
            if origin and origin.split("://", 1)[-1] != host:
                response = Response(f"refused: a request from {origin} to {host}", status_code=403)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _stop_runs_on_exit(processes: runs.Processes):
    """Runs started here are stopped (each keeping a checkpoint to resume from) when the server exits."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        yield
        processes.stop_all()

    return lifespan


def serve(host: str = "127.0.0.1", port: int = 7860, root: str = ".") -> None:
    """Serve the UI until interrupted (the `kontext-lora ui` command)."""
    import uvicorn

    root_path = Path(root).resolve()
    if not root_path.is_dir():
        raise ConfigError(f"--root {root}: not a folder")
    os.chdir(root_path)  # relative paths in configs are read from the root, as for the CLI run there
    app = create_app(root_path, host=host)
    WARMUP.start()  # torch and diffusers load in the background: the first page does not wait for them
    print(f"kontext-lora ui: http://{host}:{port}/ serving {root_path}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


class _Warmup:
    """Imports the data modules (torch) and the planner's (diffusers, PEFT) once, in one background thread.

    Pages that need them wait for it instead of importing them from several request threads at once, which
    diffusers' lazy module does not survive.
    """

    def __init__(self) -> None:
        self.data, self.planner = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ui-imports", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        try:
            import kontext_lora.data.plan  # noqa: F401
            import kontext_lora.data.preflight  # noqa: F401
        finally:  # on an import error the page imports it again itself and shows the error
            self.data.set()
        try:
            forms.warm_planner()
        finally:
            self.planner.set()

    def wait_data(self) -> None:
        self.start()
        self.data.wait()

    def wait_planner(self) -> None:
        self.start()
        self.planner.wait()


WARMUP = _Warmup()
