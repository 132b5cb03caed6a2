"""`edge devices list|show|detect`, `edge plan`, and the `--device` / `--emulate` options of run and bench."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Optional

import typer

devices_app = typer.Typer(no_args_is_help=True, rich_markup_mode=None, help="Device profiles: list, show, detect this host.")


def print_table(rows: list[tuple[str, str]]) -> None:
    """Two aligned columns: a label, then its value (every `edge` command's summary table)."""
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{w}}  {v}")


def _device_rows(d) -> list[tuple[str, str]]:
    return [("device", d.name), ("description", d.description), ("arch", d.arch),
            ("RAM", f"{d.ram_mb} MB ({d.usable_mb} MB usable after {d.headroom_mb} MB for the OS)"),
            ("cores", f"{d.cores}: " + ", ".join(f"{c.count}x {c.core}" + (f" @ {c.ghz:g} GHz" if c.ghz else "")
                                                  for c in d.clusters)),
            ("ISA features", ", ".join(d.features) or "-"),
            ("storage", f"{d.storage} ({d.storage_kind}), " +
             (f"{d.storage_read_mb_s:.0f} MB/s sequential read" if d.storage_read_mb_s else "read speed not measured")),
            ("execution providers", ", ".join(d.providers)),
            ("decode speed", f"~{d.decode_speed_estimate:g}x the reference host (estimate)" if d.decode_speed_estimate
             else "-")]


def _print_device(d, as_json: bool) -> None:
    if as_json:
        print(json.dumps(d.as_dict()))
    else:
        print_table(_device_rows(d))


@devices_app.command("list")
def list_(as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """Every device profile shipped in devices/."""
    from .devices import list_profiles
    ps = list_profiles()
    if as_json:
        print(json.dumps([p.resolve().as_dict() | {"variants": [v.name for v in p.variants],
                                                   "storage_options": [s.name for s in p.storage]} for p in ps]))
        return
    print(f"{'profile':<24} {'arch':<8} {'cores':<22} {'RAM variants':<22} {'storage (MB/s)':<30} providers")
    for p in ps:
        cores = "+".join(f"{c.count}x{c.core.replace('Cortex-', '').split()[0]}" for c in p.clusters)
        ram = "/".join(v.name for v in p.variants)
        sto = ", ".join(f"{s.name} {s.read_mb_s:g}" for s in p.storage)
        prov = ", ".join(x.replace("ExecutionProvider", "") for x in p.providers)
        print(f"{p.name:<24} {p.arch:<8} {cores:<22} {ram:<22} {sto:<30} {prov}")


@devices_app.command()
def show(name: str = typer.Argument(..., help="profile[:variant][:storage], e.g. raspberry-pi-5:8gb:nvme"),
         as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """One device, resolved to a variant and storage option."""
    from .devices import get
    _print_device(get(name), as_json)


@devices_app.command()
def detect(folder: str = typer.Option(".", help="Where to measure storage read speed (a 64 MB temp file)."),
           as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """Describe this host like a profile: cores, RAM (or a cgroup limit), CPU features, measured read speed."""
    from .devices import detect as run_detect
    _print_device(run_detect(folder), as_json)


def plan_command(bundle: str = typer.Argument(..., help="An exported bundle."),
                 device: str = typer.Option(..., "--device", help="profile[:variant][:storage] or 'host'."),
                 context: Optional[int] = typer.Option(None, "--context", help="Context window (default: min(model, 4096))."),
                 memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="Plan for at most this much "
                                                             "memory (the whole process, as `edge run` takes it)."),
                 as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """What fits on a device: dense weights, KV cache, expert cache, threads, expected decode speed."""
    from .moe import parse_bytes
    from .cli_tasks import require_task
    manifest = require_task(bundle, "text-generation", "edge plan").manifest
    budget = None if memory_budget is None else parse_bytes(memory_budget)
    p = device_plan(manifest, device, context, memory_budget=budget, folder=bundle)
    if as_json:
        print(json.dumps(p.as_dict()))
        return
    rows = [("device", p.device), ("usable memory", f"{p.usable_mb:.0f} MB"), ("context", f"{p.context} tokens"),
            ("dense part", f"{p.dense_mb:.0f} MB (weights outside the experts, runtime, tokenizer)"),
            ("KV cache", f"{p.kv_cache_mb:.0f} MB at the full context"), ("headroom", f"{p.headroom_mb:.0f} MB")]
    if p.experts_total:
        rows.append(("expert cache", f"{p.experts_cached} of {p.experts_total} experts "
                                     f"({p.experts_cached * p.per_expert_mb:.0f} MB, {p.per_expert_mb:.1f} MB each)"))
    budget_row = ("memory budget", p.memory_budget) if p.experts_total else \
        ("memory needed", f"{p.need_all_mb:.0f} MB (a dense model loads whole: no --memory-budget)")
    rows += [("everything resident", f"{p.need_all_mb:.0f} MB"), budget_row,
             ("threads", str(p.threads)),
             ("decode (estimate)", f"{p.decode_tok_s[0]:g}-{p.decode_tok_s[1]:g} tok/s" if p.decode_tok_s else "-")]
    rows += [("note", n) for n in p.notes]
    print_table(rows)
    print(f"\nrun it: edge run {bundle} \"...\" --device {device}" + (f" --context {context}" if context else "")
          + (f" --memory-budget {memory_budget}" if memory_budget else ""))


def resolve_device(name: str, folder=None):
    """A profile, or for 'host' this machine (with `folder`'s storage read speed measured, when given)."""
    from .devices import detect, get
    return detect(folder) if name == "host" else get(name)


def device_plan(manifest, name: str, context: int | None, *, memory_budget: int | None = None, folder=None):
    """The plan at `context`, or when None at the longest context (4096 down to 256) that fits. `folder`:
    the bundle's, whose storage 'host' measures for an MoE bundle (its misses are read from there)."""
    from .errors import BudgetError
    from .plan import plan
    device = resolve_device(name, folder if manifest.moe is not None else None)
    if context is not None:
        return plan(manifest, device, context=context, memory_budget=memory_budget)
    for ctx in (4096, 2048, 1024, 512, 256):
        try:
            p = plan(manifest, device, context=ctx, memory_budget=memory_budget)
        except BudgetError:
            if ctx == 256:
                raise
            continue
        if p.context < min(4096, manifest.model.max_context):
            print(f"[context {p.context}: the longest that fits {name}]", file=sys.stderr)
        return p


def apply_device(bundle: str, name: str, *, threads, context, memory_budget) -> tuple:
    """(threads, context, memory_budget) for `--device NAME`: the plan's, unless given explicitly."""
    from .bundle import open_bundle
    m = open_bundle(bundle).manifest
    p = device_plan(m, name, context, folder=bundle)
    host = len(os.sched_getaffinity(0))
    if threads is None:
        threads = min(p.threads, host)
    if memory_budget is None and m.moe is not None and p.experts_cached < p.experts_total:
        memory_budget = p.memory_budget          # else everything fits: all experts resident, fastest path
    print(f"[device {p.device}: {threads} threads, context {context or p.context}, "
          + (f"memory budget {memory_budget}" if memory_budget else f"needs ~{p.need_all_mb:.0f} MB") + "]",
          file=sys.stderr)
    return threads, context or p.context, memory_budget


def run_emulated(name: str, bundle: str, argv: list[str], *, as_json: bool) -> int:
    """Re-run this `edge` command inside cgroups shaped like device `name` (with --device in place
    of --emulate), then report what the limits saw."""
    from .emulate import Emulation
    d = resolve_device(name)
    inner = []
    it = iter(argv)
    for a in it:
        if a == "--emulate":
            inner += ["--device", next(it)]
        elif a.startswith("--emulate="):
            inner.append("--device=" + a.split("=", 1)[1])
        else:
            inner.append(a)
    with Emulation(d, bundle) as em:
        r = em.run([sys.executable, "-m", "edge", *inner], stdout=subprocess.PIPE if as_json else None, text=True)
        facts = em.facts()
    facts.update(device=d.name, returncode=r.returncode, notes=em.notes)
    if as_json:
        try:
            out = json.loads(r.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            out = {}
        print(json.dumps(dict(out, emulation=facts) if isinstance(out, dict) else {"result": out, "emulation": facts}))
    else:
        print(f"\nemulated {d.name}: memory limit {facts['memory_limit_mb']} MB (cgroup peak {facts['peak_usage_mb']} MB, "
              f"page cache included; {facts['oom_kills']} OOM kills), cpus {facts['cpus']}, reads capped at "
              f"{facts['read_mb_s_limit']} MB/s ({facts['disk_read_mb']} MB read)", file=sys.stderr)
        for n in em.notes:
            print(f"note: {n}", file=sys.stderr)
    if facts["oom_kills"]:
        print(f"error: the process was killed by the {facts['memory_limit_mb']} MB memory limit", file=sys.stderr)
        return 1
    return r.returncode
