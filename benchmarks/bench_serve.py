"""Serving throughput: the inference server in-process vs a plain diffusers-style loop.

Both run the SAME pipeline object in the same process. The baseline is the text-to-image loop
of diffusers_loop_baseline.py (`infer_case`): one request at a time, classifier-free guidance
batched as uncond+cond, DDIM, VAE decode. The server is `create_app` driven over ASGI by
`concurrency` clients (JSON in, PNG out), micro-batching concurrent requests.

    python benchmarks/bench_serve.py --tiny      # tiny random SD on CPU (seconds)
    python benchmarks/bench_serve.py             # SD1.5 shapes, random weights, bf16, on CUDA
                                                 # (the tiny one on CPU when there is no GPU)

Prints one JSON line per case and `serve_speedup: X.XX` = server images/s at concurrency 8 over
the baseline's images/s (the better of its two runs, one before and one after the server's).
Then the many-subjects case (bench_many_subjects.py): 20 LoRA subjects behind one server vs one
server per subject, a Zipf mix at concurrency 8; `--case many-subjects` runs it alone.
"""
from __future__ import annotations

import argparse
import asyncio
import json
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
def plain_loop_images_per_s(pipeline: object, device: str, steps: int, guidance: float, requests: int) -> dict:
    """diffusers_loop_baseline.infer_case on our pipeline: one request (one image) at a time."""
    from diffusers import DDIMScheduler

    unet, vae, text_encoder, tokenizer = pipeline.unet, pipeline.vae, pipeline.text_encoder, pipeline.tokenizer
    scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    size = unet.config.sample_size

    def one_request(seed: int) -> torch.Tensor:
        ids = tokenizer(["", f"a photo of sks dog {seed}"], padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        encoded = text_encoder(ids)[0]
        scheduler.set_timesteps(steps)
        generator = torch.Generator("cpu").manual_seed(seed)
        latents = torch.randn(1, 4, size, size, generator=generator).to(device, unet.dtype)
        for t in scheduler.timesteps:
            noise = unet(torch.cat([latents, latents]), t, encoded).sample
            uncond, cond = noise.chunk(2)
            latents = scheduler.step(uncond + guidance * (cond - uncond), t, latents).prev_sample
        return vae.decode(latents / vae.config.scaling_factor).sample

    one_request(0)  # warm-up
    synchronize(device)
    started = time.perf_counter()
    for seed in range(requests):
        one_request(seed)
    synchronize(device)
    seconds = time.perf_counter() - started
    return {"case": "plain loop, one request at a time", "requests": requests, "seconds": round(seconds, 3),
            "images_per_s": round(requests / seconds, 3)}


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


async def run_server_cases(pipeline: object, device: str, args: argparse.Namespace) -> list[dict]:
    from dreambooth_serving.app import ServerSettings, create_app
    from dreambooth_serving.runtime import ready_for_serving

    settings = ServerSettings(device=device, max_batch=8, max_queue=256, max_wait_s=args.max_wait, compile=args.compile)
    app = create_app(settings, load=lambda: ready_for_serving(pipeline, device, args.compile))
    results = []
    async with app.router.lifespan_context(app):
        runtime = app.state.runtime
        while not runtime.ready:
            if runtime.state == "failed":
                raise RuntimeError(runtime.error)
            await asyncio.sleep(0.05)
        for concurrency, requests in ((1, args.requests), (8, args.requests_concurrent)):
            results.append(await server_images_per_s(app, concurrency, requests, args.steps, args.guidance))
    return results


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
    info = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
            "model": "tiny" if args.tiny else "SD1.5 shapes, random weights, bf16", "steps": args.steps,
            "size": pipeline.unet.config.sample_size * pipeline.vae_scale_factor}
    print(json.dumps(info), flush=True)
    args.size = info["size"]
    if args.case in ("all", "throughput"):
        throughput_cases(pipeline, device, args)
    if args.case in ("all", "many-subjects"):
        sys.path.insert(0, str(Path(__file__).parent))
        import bench_many_subjects

        bench_many_subjects.report(bench_many_subjects.many_subjects(pipeline, device, args))
    return 0


def throughput_cases(pipeline: object, device: str, args: argparse.Namespace) -> None:
    # The baseline runs before AND after the server (same modules; the server's channels-last
    # layout then applies to it too) and its better figure is the one compared against.
    before = plain_loop_images_per_s(pipeline, device, args.steps, args.guidance, args.requests)
    served = asyncio.run(run_server_cases(pipeline, device, args))
    after = plain_loop_images_per_s(pipeline, device, args.steps, args.guidance, args.requests)
    after["case"] += " (again, after the server)"
    baseline = max(before, after, key=lambda result: result["images_per_s"])
    for result in (before, after, *served):
        if result in served:
            result["vs_baseline"] = round(result["images_per_s"] / baseline["images_per_s"], 2)
        print(json.dumps(result), flush=True)
    print(f"serve_speedup: {served[-1]['images_per_s'] / baseline['images_per_s']:.2f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
