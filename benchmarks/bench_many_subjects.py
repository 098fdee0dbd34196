"""Many subjects, one server: 20 LoRA subjects behind one server vs one server per subject.

Three cases in one process, on one device, each driven over ASGI through the OpenAI Images API
(`/v1/images/generations`, JSON in, base64 PNG out) by `concurrency` clients:

- dedicated: one subject's server (its LoRA fused into the base weights, as a full `final/`
  model is served), every request for that subject: the baseline for images/s and memory;
- twenty dedicated: 20 such servers side by side (the status quo: a Deployment per job), the
  same Zipf mix of requests over the 20 subjects, each routed to its subject's server;
- shared: ONE server with the base model and the 20 subjects as adapters (`--adapter`), the
  same Zipf mix; the same again with one subject per batch (`--max-adapters-per-batch 1`).

Memory is the bytes of the weights a case keeps on the device (parameters and buffers of
every model, adapters included), and on CUDA also the peak allocated while it runs. The cases
take turns over `--rounds` rounds (the order rotating), and a ratio is the median over rounds
of the ratio measured within a round: the load of a shared machine swings between minutes.
Prints one JSON line per case, then
`many_subjects_memory_ratio` (shared / dedicated; goal <= 1.2) and
`many_subjects_throughput_ratio` (shared images/s on the mix / dedicated images/s; goal >= 0.8);
on a CPU also `many_subjects_cpu_work_ratio`, the same on images per CPU-second of this process
(the device is the CPU; other load changes wall time more than work), and
`many_subjects_batch_compute_ratio`: the same batches run directly, batch for batch (below);
and `many_subjects_adapter_copy_mib_per_batch`: what a batch of 8 subjects holds for its rows'
adapters beyond their weights, before (per-row copies) and after (gathered per adapter).
"""
from __future__ import annotations

import asyncio
import copy
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SUBJECTS = 20
ZIPF_EXPONENT = 1.0
LORA_RANK = 4
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def write_random_adapter(unet: torch.nn.Module, folder: Path, seed: int, rank: int = LORA_RANK) -> Path:
    """A rank-`rank` LoRA on the attention projections, as the trainer targets them (peft keys)."""
    from safetensors.torch import save_file

    generator = torch.Generator("cpu").manual_seed(seed)
    state = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(LORA_TARGETS):
            state[f"unet.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) / module.in_features**0.5
            state[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) / rank**0.5
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, str(folder / "pytorch_lora_weights.safetensors"))
    return folder


def weight_bytes(pipeline: Any) -> int:
    return sum(tensor.numel() * tensor.element_size()
               for component in pipeline.components.values() if isinstance(component, torch.nn.Module)
               for tensor in (*component.parameters(), *component.buffers()))


def fused(base: Any, adapter: Path) -> Any:
    """The base pipeline with one subject's LoRA merged in: what a dedicated server holds."""
    pipeline = copy.deepcopy(base)
    pipeline.load_lora_weights(str(adapter), weight_name="pytorch_lora_weights.safetensors", adapter_name="subject")
    pipeline.fuse_lora()
    pipeline.unload_lora_weights()
    return pipeline


def zipf_mix(models: list[str], count: int, seed: int = 0) -> list[str]:
    weights = [1 / rank**ZIPF_EXPONENT for rank in range(1, len(models) + 1)]
    return random.Random(seed).choices(models, weights=weights, k=count)


async def ready(app: Any) -> None:
    runtime = app.state.runtime
    while not runtime.ready:
        if runtime.state == "failed":
            raise RuntimeError(runtime.error)
        await asyncio.sleep(0.02)


async def drive(route: Callable[[str], Any], mix: list[str], concurrency: int, steps: int, size: int) -> float:
    """`concurrency` clients, each sending its next request when its last one is answered; seconds."""
    import httpx

    clients: dict[int, httpx.AsyncClient] = {}

    def client_for(model: str) -> httpx.AsyncClient:
        app = route(model)
        if id(app) not in clients:
            clients[id(app)] = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://localhost", timeout=600)
        return clients[id(app)]

    queue = list(enumerate(mix))

    async def client_loop() -> None:
        while queue:
            index, model = queue.pop(0)
            body = {"model": model, "prompt": f"a photo of sks dog {index}", "seed": index, "steps": steps, "size": f"{size}x{size}"}
            response = await client_for(model).post("/v1/images/generations", json=body)
            if response.status_code != 200:
                raise RuntimeError(f"{model}: {response.status_code} {response.text[:200]}")

    warm_up = list(dict.fromkeys(mix))  # every subject once: adapters loaded, kernels warm
    queue = list(enumerate(warm_up))
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    queue = list(enumerate(mix))
    started = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(concurrency)))
    seconds = time.perf_counter() - started
    for client in clients.values():
        await client.aclose()
    return seconds


@dataclass
class Case:
    name: str
    apps: dict[str, Any]  # the server that answers each subject
    mix: list[str]
    weights: Callable[[], int]  # bytes of weights on the device (read after the run: adapters load on use)
    runs: list[dict] = field(default_factory=list)


async def measure(case: Case, args: Any, device: str) -> dict:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    cpu_started = time.process_time()
    seconds = await drive(case.apps.__getitem__, case.mix, args.concurrency, args.steps, args.size)
    cpu_seconds = time.process_time() - cpu_started
    result = {"case": case.name, "requests": len(case.mix), "subjects": len(set(case.mix)), "seconds": round(seconds, 3),
              "images_per_s": round(len(case.mix) / seconds, 3), "images_per_cpu_s": round(len(case.mix) / cpu_seconds, 3),
              "weights_mib": round(case.weights() / 2**20, 2)}
    if device == "cuda":
        result["peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return result


async def run_rounds(cases: list[Case], args: Any, device: str) -> list[dict]:
    """Every case once per round, in an order that rotates from round to round, so each round
    compares the cases under the same load (a shared machine's load swings between minutes)."""
    apps = list({id(app): app for case in cases for app in case.apps.values()}.values())
    contexts = [app.router.lifespan_context(app) for app in apps]
    for context in contexts:
        await context.__aenter__()
    try:
        for app in apps:
            await ready(app)
        for round_ in range(args.rounds):
            for case in cases[round_ % len(cases):] + cases[:round_ % len(cases)]:
                case.runs.append(await measure(case, args, device))
    finally:
        for context in reversed(contexts):
            await context.__aexit__(None, None, None)
    baseline = cases[0].runs
    results = []
    for case in cases:
        ratios = [run["images_per_s"] / base["images_per_s"] for run, base in zip(case.runs, baseline)]
        cpu_ratios = [run["images_per_cpu_s"] / base["images_per_cpu_s"] for run, base in zip(case.runs, baseline)]
        median = sorted(case.runs, key=lambda run: run["images_per_s"])[len(case.runs) // 2]
        results.append({**median, "rounds": len(case.runs), "images_per_s_each_round": [run["images_per_s"] for run in case.runs],
                        "vs_dedicated_images_per_s": round(statistics.median(ratios), 2),
                        "vs_dedicated_images_per_cpu_s": round(statistics.median(cpu_ratios), 2)})
    return results


def many_subjects(base: Any, device: str, args: Any) -> list[dict]:
    """The cases on `base` (a ready pipeline on `device`)."""
    from dreambooth_serving.app import ServerSettings, create_app
    from dreambooth_serving.runtime import ready_for_serving

    names = [f"subject-{index:02d}" for index in range(SUBJECTS)]
    with tempfile.TemporaryDirectory() as folder:
        adapters = {name: write_random_adapter(base.unet, Path(folder, name), seed) for seed, name in enumerate(names)}
        mix = zipf_mix(names, args.mix_requests)

        def server(pipeline: Any, **settings: Any) -> Any:
            config = ServerSettings(device=device, max_batch=8, max_queue=256, max_wait_s=args.max_wait, **settings)
            return create_app(config, load=lambda: ready_for_serving(pipeline, device))

        dedicated = {name: fused(base, adapters[name]) for name in names}
        one = names[0]
        shared = {per_batch: copy.deepcopy(base) for per_batch in (8, 1)}
        shared_apps = {per_batch: server(pipeline, model="base", max_adapters_per_batch=per_batch,
                                         adapters=tuple((name, str(adapters[name])) for name in names))
                       for per_batch, pipeline in shared.items()}
        per_subject = {name: server(dedicated[name], model=name) for name in names}
        cases = [
            Case("dedicated: one subject's server, that subject only", {one: per_subject[one]}, [one] * args.mix_requests,
                 lambda: weight_bytes(dedicated[one])),
            Case(f"twenty dedicated: {SUBJECTS} servers, Zipf mix", per_subject, mix,
                 lambda: sum(weight_bytes(pipeline) for pipeline in dedicated.values())),
            Case(f"shared: one server, {SUBJECTS} adapters, Zipf mix", dict.fromkeys(names, shared_apps[8]), mix,
                 lambda: weight_bytes(shared[8])),
            Case(f"shared, one subject per batch: one server, {SUBJECTS} adapters, Zipf mix", dict.fromkeys(names, shared_apps[1]),
                 mix, lambda: weight_bytes(shared[1])),
        ]
        results = asyncio.run(run_rounds(cases, args, device))
        for result, app in zip(results[2:], (shared_apps[8], shared_apps[1])):
            result["adapters_resident"] = len(app.state.runtime.adapters.sizes)
        results.append(adapter_copy_memory(base, adapters, names[:8], args))
        if device == "cpu":
            ratio = batch_compute_ratio(base, dedicated[one], adapters, mix, args)
            results.append({"case": "batch for batch: the mix in batches of 8, per-row adapters, vs batches of 8 on the fused model",
                            "vs_dedicated_images_per_cpu_s": round(ratio, 2)})
    return results


def batch_compute_ratio(base: Any, dedicated: Any, adapters: dict[str, Path], mix: list[str], args: Any) -> float:
    """Work per image of the shared server's batches over the dedicated server's, batch for batch:
    the mix cut into batches of 8 run through the generation code with per-row adapters, each
    paired with a batch of 8 on the fused model, thread CPU time, the median of the pairs'
    ratios. No HTTP, no batching window: what the device does per image, whatever the load."""
    from dreambooth_serving.adapters import AdapterLimits, ResidentAdapters
    from dreambooth_trainer.generate import ImageRequest, generate_images

    shared = copy.deepcopy(base)
    resident = ResidentAdapters(shared, AdapterLimits())
    resident.ensure(list(adapters), lambda name: adapters[name] / "pytorch_lora_weights.safetensors")
    batches = [mix[start:start + 8] for start in range(0, len(mix) - 7, 8)]
    ratios = []
    with torch.no_grad():
        for index, models in enumerate(batches):
            requests = [ImageRequest(f"a photo of sks dog {index}", "", index * 8 + row) for row in range(len(models))]
            started = time.thread_time()
            generate_images(dedicated, requests, steps=args.steps)
            fused_seconds = time.thread_time() - started
            started = time.thread_time()
            with resident.routing(models):
                generate_images(shared, requests, steps=args.steps)
            ratios.append(fused_seconds / (time.thread_time() - started))
    return statistics.median(ratios[1:])  # the first pair warms both up


def adapter_copy_memory(base: Any, adapters: dict[str, Path], models: list[str], args: Any) -> dict:
    """What one batch of `models` (8 requests, each its own subject) holds for its rows' adapters
    beyond their weights. Before: each row's A and B of every Linear LoRA layer, stacked per row
    and kept for the whole batch (the server's path until issue 21, rebuilt here layer by layer,
    each layer's copies freed at once, and counted). After: measured, what the routing holds
    while the batch runs (the rows' indices: each adapter's weights are used in place)."""
    from dreambooth_serving.adapters import AdapterLimits, ResidentAdapters, gathers, lora_layers
    from dreambooth_trainer.generate import ImageRequest, generate_images

    shared = copy.deepcopy(base)
    resident = ResidentAdapters(shared, AdapterLimits())
    resident.ensure(list(adapters), lambda name: adapters[name] / "pytorch_lora_weights.safetensors")
    requests = [ImageRequest(f"a photo of sks dog {row}", "", row) for row in range(len(models))]
    with torch.no_grad(), resident.routing(models):
        generate_images(shared, requests, steps=1)
        after = resident.batch_copy_bytes()
        rows = max(resident.groups)  # rows per denoiser call: classifier-free guidance doubles them
        names = resident.rows * resident.copies(rows)
        before = sum(per_row_copy_bytes(layer, names) for layer in lora_layers(shared) if gathers(layer))
    adapter_mib = statistics.mean(resident.sizes.values()) / 2**20
    return {"case": f"adapter copies per batch: {len(models)} requests of {len(set(models))} subjects, {rows} rows",
            "adapter_mib": round(adapter_mib, 3), "before_per_row_copies_mib": round(before / 2**20, 3),
            "after_mib": round(after / 2**20, 6), "before_over_rows_x_adapter": round(before / 2**20 / (rows * adapter_mib), 2)}


def per_row_copy_bytes(layer: Any, names: list[str]) -> int:
    """Bytes one layer's per-row copies held for the batch on the old path: the batch's adapters'
    A and B stacked (a zero pair first, for base rows; freed once indexed), then indexed per row."""
    with torch.no_grad():
        downs = [layer.lora_A[name].weight for name in dict.fromkeys(names) if name in layer.lora_A]
        ups = [layer.lora_B[name].weight for name in dict.fromkeys(names) if name in layer.lora_B]
        down, up = torch.stack([torch.zeros_like(downs[0]), *downs]), torch.stack([torch.zeros_like(ups[0]), *ups])
        slot = {name: index + 1 for index, name in enumerate(dict.fromkeys(names)) if name in layer.lora_A}
        index = torch.tensor([slot.get(name, 0) for name in names])
        return sum(t.numel() * t.element_size() for t in (down[index], up[index]))


def sd15_shapes_memory_ratio(subjects: int = SUBJECTS, rank: int = LORA_RANK) -> float:
    """(base + `subjects` rank-`rank` adapters) / base, counted on SD1.5's real shapes (meta
    device: no memory, no download): what the ratio is at the size the tiny model stands in for."""
    import sys

    from peft import LoraConfig

    sys.path.insert(0, str(Path(__file__).parent))
    import diffusers_loop_baseline as baseline

    with torch.device("meta"):
        unet, vae, text_encoder, _ = baseline.build(tiny=False)
    base = sum(p.numel() for module in (unet, vae, text_encoder) for p in module.parameters())
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(LORA_TARGETS)))
    adapter = sum(p.numel() for name, p in unet.named_parameters() if "lora_" in name)
    return (base + subjects * adapter) / base


def report(results: list[dict]) -> None:
    """One line per case (its median round; vs_dedicated_images_per_s is the median over rounds of
    the ratio measured within each round), then the two goal ratios."""
    dedicated, _, shared, _ = results[:4]
    for result in results:
        if "weights_mib" in result:
            result["vs_dedicated_memory"] = round(result["weights_mib"] / dedicated["weights_mib"], 3)
        print(json.dumps(result), flush=True)
    print(json.dumps({"case": "SD1.5 shapes, counted", "memory_ratio_20_subjects": round(sd15_shapes_memory_ratio(), 3)}), flush=True)
    print(f"many_subjects_memory_ratio: {shared['weights_mib'] / dedicated['weights_mib']:.3f}", flush=True)
    print(f"many_subjects_throughput_ratio: {shared['vs_dedicated_images_per_s']:.2f}", flush=True)
    copies = next(result for result in results if "before_per_row_copies_mib" in result)
    print(f"many_subjects_adapter_copy_mib_per_batch: before {copies['before_per_row_copies_mib']:.3f}, "
          f"after {copies['after_mib']:.6f}", flush=True)
    if "peak_allocated_mib" not in shared:  # on a CPU the device is the CPU: what each image costs it, whatever else runs
        print(f"many_subjects_cpu_work_ratio: {shared['vs_dedicated_images_per_cpu_s']:.2f}", flush=True)
        print(f"many_subjects_batch_compute_ratio: {results[-1]['vs_dedicated_images_per_cpu_s']:.2f}", flush=True)
