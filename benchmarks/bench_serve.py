"""Serving throughput: the inference server in-process vs a plain diffusers-style loop.

Both run the SAME pipeline object in the same process, after the server has made it ready (so the
loop gets the server's memory layout too). The baseline is the text-to-image loop of
diffusers_loop_baseline.py (`infer_case`): classifier-free guidance batched as uncond+cond, DDIM,
VAE decode, no PNG; run one request at a time, and with 8 requests per call (what the server's
micro-batches hold). The server is `create_app` driven over ASGI by `concurrency` clients (JSON in,
PNG out), micro-batching concurrent requests. The four cases take turns for `--throughput-rounds`
rounds, the order rotating; a ratio is the median of the ratios within each round.

    python benchmarks/bench_serve.py --tiny      # tiny random SD on CPU (seconds)
    python benchmarks/bench_serve.py             # SD1.5 shapes, random weights, bf16, on CUDA
                                                 # (the tiny one on CPU when there is no GPU)

Prints one JSON line per case and round, then
  serve_speedup                   HEADLINE: server at concurrency 8 / the same loop at batch 8 (like
                                  for like: what the server's HTTP, PNG and batching cost or save)
  serve_speedup_vs_one_at_a_time  server at concurrency 8 / the loop one request at a time (what a
                                  user of a loop that cannot batch gains)
  serve_concurrency_1             server at concurrency 1 / the loop one request at a time
Then the many-subjects case (bench_many_subjects.py): 20 LoRA subjects behind one server vs one
server per subject, a Zipf mix at concurrency 8; `--case many-subjects` runs it alone.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
import time
import warnings

import torch


def sd15_random_pipeline() -> object:
    """StableDiffusionPipeline with SD1.5's architecture and random weights (nothing downloaded):
    the very modules the baseline benchmark builds."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from dreambooth_trainer.tiny import tiny_tokenizer

    sys.path.insert(0, str(Path(__file__).parent))
    import diffusers_loop_baseline as baseline

    torch.manual_seed(0)
    with torch.device("cuda"):
        unet, vae, text_encoder, _ = baseline.build(tiny=False)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipeline = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(), unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    return pipeline.to(dtype=torch.bfloat16)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def plain_loop_images_per_s(pipeline: object, device: str, steps: int, guidance: float, requests: int, batch: int = 1) -> dict:
    """diffusers_loop_baseline.infer_case on our pipeline: `batch` requests (one image each, noise
    from each one's seed) per call, CFG as one uncond+cond batch."""
    from diffusers import DDIMScheduler

    unet, vae, text_encoder, tokenizer = pipeline.unet, pipeline.vae, pipeline.text_encoder, pipeline.tokenizer
    scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    size = unet.config.sample_size

    def one_call(seeds: list[int]) -> torch.Tensor:
        prompts = [""] * len(seeds) + [f"a photo of sks dog {seed}" for seed in seeds]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(device)
        encoded = text_encoder(ids)[0]
        scheduler.set_timesteps(steps)
        latents = torch.cat([torch.randn(1, 4, size, size, generator=torch.Generator("cpu").manual_seed(seed)) for seed in seeds])
        latents = latents.to(device, unet.dtype)
        for t in scheduler.timesteps:
            noise = unet(torch.cat([latents, latents]), t, encoded).sample
            uncond, cond = noise.chunk(2)
            latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
        return vae.decode(latents / vae.config.scaling_factor).sample

    one_call(list(range(batch)))  # warm-up at this batch size
    synchronize(device)
    calls = max(1, requests // batch)
    started = time.perf_counter()
    for call in range(calls):
        one_call(list(range(call * batch, (call + 1) * batch)))
    synchronize(device)
    seconds = time.perf_counter() - started
    case = "plain loop, one request at a time" if batch == 1 else f"plain loop, {batch} requests per call"
    return {"case": case, "requests": calls * batch, "seconds": round(seconds, 3), "images_per_s": round(calls * batch / seconds, 3)}


async def server_images_per_s(app: object, concurrency: int, requests: int, steps: int, guidance: float) -> dict:
    """`concurrency` clients, each sending its next request when the last one is answered."""
    import httpx

    sent = 0

    async def client_loop(client: httpx.AsyncClient) -> None:
        nonlocal sent
        while sent < requests:
            sent += 1
            body = {"prompt": f"a photo of sks dog {sent}", "steps": steps, "guidance_scale": guidance, "seed": sent}
            response = await client.post("/v1/generate", json=body)
            if response.status_code != 200:
                raise RuntimeError(f"server answered {response.status_code}: {response.text[:200]}")

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost", timeout=600) as client:
        # a short warm-up through the same path, at the batch size this run will see
        await asyncio.gather(*(client.post("/v1/generate", json={"prompt": "warm", "steps": 2, "seed": worker})
                               for worker in range(concurrency)))
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    return {"case": f"server, concurrency {concurrency}", "requests": requests, "seconds": round(seconds, 3),
            "images_per_s": round(requests / seconds, 3)}


THROUGHPUT_CASES = ("loop, batch 1", "loop, batch 8", "server, concurrency 1", "server, concurrency 8")
RATIOS = {  # figure: (numerator case, denominator case)
    "serve_speedup": ("server, concurrency 8", "loop, batch 8"),
    "serve_speedup_vs_one_at_a_time": ("server, concurrency 8", "loop, batch 1"),
    "serve_concurrency_1": ("server, concurrency 1", "loop, batch 1"),
}


async def run_throughput_rounds(pipeline: object, device: str, args: argparse.Namespace) -> dict[str, list[dict]]:
    """Every case once per round, the order rotating, all on the pipeline the server made ready."""
    from dreambooth_serving.app import ServerSettings, create_app
    from dreambooth_serving.runtime import ready_for_serving

    sys.path.insert(0, str(Path(__file__).parent))
    import measure

    settings = ServerSettings(device=device, max_batch=8, max_queue=256, max_wait_s=args.max_wait, compile=args.compile)
    app = create_app(settings, load=lambda: ready_for_serving(pipeline, device, args.compile))
    cases = {
        "loop, batch 1": lambda: plain_loop_images_per_s(pipeline, device, args.steps, args.guidance, args.requests),
        "loop, batch 8": lambda: plain_loop_images_per_s(pipeline, device, args.steps, args.guidance, args.requests_concurrent, batch=8),
        "server, concurrency 1": lambda: server_images_per_s(app, 1, args.requests, args.steps, args.guidance),
        "server, concurrency 8": lambda: server_images_per_s(app, 8, args.requests_concurrent, args.steps, args.guidance),
    }
    runs: dict[str, list[dict]] = {name: [] for name in cases}
    async with app.router.lifespan_context(app):
        runtime = app.state.runtime
        while not runtime.ready:
            if runtime.state == "failed":
                raise RuntimeError(runtime.error)
            await asyncio.sleep(0.05)
        for round_ in range(args.throughput_rounds):
            order = THROUGHPUT_CASES[round_ % 4:] + THROUGHPUT_CASES[:round_ % 4]
            for name in order:
                result = cases[name]()
                if asyncio.iscoroutine(result):
                    result = await result
                result = {**result, "round": round_, "load_average_1min": measure.load_average()}
                runs[name].append(result)
                measure.emit(result)
    return runs


def main() -> int:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random SD on CPU")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (tiny: 4, SD1.5: 25)")
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--requests", type=int, default=None, help="requests one at a time (baseline, concurrency 1)")
    parser.add_argument("--requests-concurrent", type=int, default=None, help="requests at concurrency 8")
    parser.add_argument("--max-wait", type=float, default=0.02, help="the batcher's wait for more requests, s")
    parser.add_argument("--compile", action="store_true", help="torch.compile the server's UNet")
    parser.add_argument("--case", choices=("all", "throughput", "many-subjects"), default="all")
    parser.add_argument("--mix-requests", type=int, default=None, help="requests per many-subjects case (tiny: 96, SD1.5: 48)")
    parser.add_argument("--concurrency", type=int, default=8, help="clients in the many-subjects cases")
    parser.add_argument("--rounds", type=int, default=5, help="many-subjects rounds (ratios: the median over rounds)")
    parser.add_argument("--throughput-rounds", type=int, default=3, help="throughput rounds (ratios: the median over rounds)")
    args = parser.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        print("no CUDA device: running the tiny model on the CPU", file=sys.stderr)
        args.tiny = True
    if args.tiny:
        device = "cpu"
        # One intra-op thread: on a small shared CPU, OpenMP teams waiting on descheduled
        # threads swing the timings by 10x; the tiny model gains nothing from more.
        torch.set_num_threads(1)
        from dreambooth_trainer.tiny import tiny_pipeline

        pipeline = tiny_pipeline(seed=0)
        defaults = (4, 24, 64, 96)
    else:
        device = "cuda"
        pipeline = sd15_random_pipeline()
        defaults = (25, 6, 32, 48)
    args.steps = args.steps or defaults[0]
    args.requests = args.requests or defaults[1]
    args.requests_concurrent = args.requests_concurrent or defaults[2]
    args.mix_requests = args.mix_requests or defaults[3]
    pipeline.to(device)
    sys.path.insert(0, str(Path(__file__).parent))
    import measure

    info = {"record": measure.run_record(), "model": "tiny" if args.tiny else "SD1.5 shapes, random weights, bf16", "steps": args.steps,
            "size": pipeline.unet.config.sample_size * pipeline.vae_scale_factor}
    measure.emit(info)
    args.size = info["size"]
    if args.case in ("all", "throughput"):
        throughput_cases(pipeline, device, args)
    if args.case in ("all", "many-subjects"):
        sys.path.insert(0, str(Path(__file__).parent))
        import bench_many_subjects

        bench_many_subjects.report(bench_many_subjects.many_subjects(pipeline, device, args))
    return 0


def throughput_cases(pipeline: object, device: str, args: argparse.Namespace) -> None:
    import statistics

    import measure

    runs = asyncio.run(run_throughput_rounds(pipeline, device, args))
    figures = {}
    for name, (top, bottom) in RATIOS.items():
        ratios = [a["images_per_s"] / b["images_per_s"] for a, b in zip(runs[top], runs[bottom])]
        figures[name] = statistics.median(ratios) if ratios else None
        measure.emit({"figure": name, "value": None if figures[name] is None else round(figures[name], 4), "of": f"{top} / {bottom}", "rounds": len(ratios),
                      "per_round": [round(r, 4) for r in ratios], "spread": [round(min(ratios), 4), round(max(ratios), 4)] if ratios else None,
                      "medians_images_per_s": {case: statistics.median(run["images_per_s"] for run in runs[case]) for case in (top, bottom)},
                      "headline": name == "serve_speedup"})
    for name, value in figures.items():
        measure.say(name, value)


if __name__ == "__main__":
    sys.exit(main())
