import socket
import threading

import pytest
import torch
from PIL import Image

from dreambooth_trainer.class_images import class_cache_key
from dreambooth_trainer.data import decode_image, draw_indices, mix_seed, step_generator, to_pixels
from dreambooth_trainer.distributed import DistEnv, dist_env_from, wait_for_master
from dreambooth_trainer.errors import UserInputError


def test_draws_cover_every_image_once_per_epoch_and_repeat_exactly() -> None:
    first = [draw_indices(0, 0, 5, m, 0, 1, 1, False)[0].index for m in range(5)]
    assert sorted(first) == [0, 1, 2, 3, 4]
    again = [draw_indices(0, 0, 5, m, 0, 1, 1, False)[0].index for m in range(5)]
    assert first == again
    other_seed = [draw_indices(1, 0, 5, m, 0, 1, 1, False)[0].index for m in range(10)]
    assert other_seed != first + first


def test_ranks_draw_disjoint_slots_of_the_same_epoch() -> None:
    world = 2
    seen = [draw_indices(3, 0, 4, m, r, world, 1, False)[0].index for m in range(2) for r in range(world)]
    assert sorted(seen) == [0, 1, 2, 3]


def test_step_generator_depends_on_step_and_rank_only() -> None:
    a = torch.randn(3, generator=step_generator(0, 5, 0))
    assert torch.equal(a, torch.randn(3, generator=step_generator(0, 5, 0)))
    assert not torch.equal(a, torch.randn(3, generator=step_generator(0, 5, 1)))
    assert not torch.equal(a, torch.randn(3, generator=step_generator(0, 6, 0)))
    assert mix_seed(1, 2) != mix_seed(2, 1)


def test_pixels_are_square_scaled_and_flipped() -> None:
    image = Image.new("RGB", (80, 40), (255, 0, 0))
    image.putpixel((0, 20), (0, 0, 255))
    pixels = to_pixels(image, 16, True, False)
    assert pixels.shape == (3, 16, 16)
    assert pixels.min() >= -1 and pixels.max() <= 1
    flipped = to_pixels(image, 16, True, True)
    assert torch.equal(flipped, pixels.flip(-1))


def test_corrupt_image_names_the_object() -> None:
    with pytest.raises(UserInputError, match=r"instance image s3://b/dog/3.jpg is not a readable image"):
        decode_image(b"\xff\xd8\xff\xe0 truncated", "s3://b/dog/3.jpg", "instance image")


def test_class_cache_key_changes_with_every_field() -> None:
    base = dict(model="tiny", class_prompt="a dog", resolution=512, sampler="ddim", steps=25, guidance=7.5, seed=0, count=10)
    key = class_cache_key(**base)
    assert key == class_cache_key(**base)
    for field, value in [("model", "x"), ("class_prompt", "a cat"), ("resolution", 256), ("sampler", "euler"), ("seed", 1), ("count", 11)]:
        assert class_cache_key(**{**base, field: value}) != key, field


def test_env_contract_is_parsed_and_checked() -> None:
    env = dist_env_from({"MASTER_ADDR": "job-0.svc", "MASTER_PORT": "2345", "NNODES": "2", "NODE_RANK": "1", "NPROC_PER_NODE": "8"})
    assert (env.world_size, env.master_addr, env.master_port) == (16, "job-0.svc", 2345)
    with pytest.raises(UserInputError, match="NODE_RANK=2 must be < NNODES=2"):
        dist_env_from({"NNODES": "2", "NODE_RANK": "2"})
    with pytest.raises(UserInputError, match="NNODES='two'"):
        dist_env_from({"NNODES": "two"})


def test_non_master_waits_for_the_port_then_proceeds() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def open_later() -> None:
        listener.bind(("127.0.0.1", port))
        listener.listen()

    timer = threading.Timer(1.0, open_later)
    timer.start()
    try:
        wait_for_master(DistEnv("127.0.0.1", port, nnodes=2, node_rank=1), timeout=20, poll=0.1)
    finally:
        timer.cancel()
        listener.close()


def test_wait_for_master_gives_a_clear_timeout() -> None:
    with pytest.raises(TimeoutError, match="master no-such-host.invalid:29500 did not resolve"):
        wait_for_master(DistEnv("no-such-host.invalid", 29500, nnodes=2, node_rank=0), timeout=1, poll=0.2)
