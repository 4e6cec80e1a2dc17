"""runner.process.pool with real runner processes: the default model and tiny
random-weight llamas (benchmarks/tiny_model.py).  The policy's own tables
are in tests/test_pool_policy.py."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
from pathlib import Path

import pytest

from polling import wait_until
from runner.engine.requests import BadRequest, Chunk, Final
from runner.model.gguf import GGUFError
from runner.process import pool_fit
from runner.process.pool import DoesNotFit, ModelFailed, ModelLoadError, RunnerCrashed, RunnerPool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from tiny_model import write_tiny_llama  # noqa: E402

LOAD = {"n_ctx": 256, "n_threads": 2, "cache_ram_mb": 0}
FOREVER = {"num_predict": -1, "ignore_eos": True, "temperature": 0}  # until cancelled (context shift)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, default_model_path):
    """Two different tiny models (the default model's tokenizer, seeded weights)."""
    folder = tmp_path_factory.mktemp("pool-models")
    return [str(write_tiny_llama(folder / f"tiny-{seed}.gguf", seed=seed)) for seed in (0, 1)]


def need(model: str) -> int:
    return pool_fit.footprint(model, pool_fit.load_message(LOAD), on_gpu=False)


def kinds(pool: RunnerPool, *events: str) -> list[tuple[str, str]]:
    return [(e["event"], e["model"]) for e in pool.events() if e["event"] in events]


def test_concurrent_requests_for_a_cold_model_share_one_load(tiny):
    with RunnerPool(load=LOAD) as pool:
        results: list = []

        def ask(i: int) -> None:
            results.append(pool.complete(tiny[0], f"request {i} ✓ 猫", num_predict=4, temperature=0).text())

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(results) == 6 and all(f.eval_count == 4 for _, f in results)
        assert kinds(pool, "load", "ready") == [("load", tiny[0]), ("ready", tiny[0])]
        assert pool.state()["models"][tiny[0]]["in_flight"] == 0
        with pool.hold(tiny[0]) as runner:  # any call, on a runner that cannot go meanwhile
            assert runner.tokenize("Hi") and pool.state()["models"][tiny[0]]["in_flight"] == 1
            assert pool.unload(tiny[0]) is False
        assert pool.unload(tiny[0]) is True
        wait_until(lambda: not pool.state()["models"])


def test_asyncio_requests_share_one_load(tiny):
    async def main() -> tuple:
        async with RunnerPool(load=LOAD) as pool:
            prompts = ["Hi", "¿qué? 🦙", "\u200b\u0301", ""]  # the empty prompt is refused by the runner
            streams = await asyncio.gather(*(pool.acomplete(tiny[1], p, num_predict=3, temperature=0)
                                             for p in prompts))
            texts = await asyncio.gather(*(s.text() for s in streams), return_exceptions=True)
            return texts, kinds(pool, "load"), pool.state()["models"][tiny[1]]["in_flight"]

    texts, loads, in_flight = asyncio.run(main())
    assert [f.eval_count for _, f in texts[:3]] == [3, 3, 3]
    assert isinstance(texts[3], BadRequest) and "empty" in str(texts[3])
    assert loads == [("load", tiny[1])] and in_flight == 0


def test_more_models_than_the_budget_unloads_the_least_recently_used(tiny, default_model_path):
    small, big = need(tiny[0]), need(str(default_model_path))
    assert need(tiny[1]) == small
    default = str(default_model_path)
    # room for one tiny model and the default model, not for all three
    with RunnerPool(memory_budget=small + big + small // 2, load=LOAD) as pool:
        for model in (tiny[0], default, tiny[0], tiny[1]):
            pool.complete(model, "Hi", num_predict=2, temperature=0).text()
        assert kinds(pool, "evict") == [("evict", default)]   # tiny[0] was used after it
        pool.complete(default, "Hi", num_predict=2, temperature=0).text()
        assert kinds(pool, "evict") == [("evict", default), ("evict", tiny[0])]
        state = pool.state()
        assert sorted(state["models"]) == sorted([tiny[1], default])
        assert state["memory"]["used"] == small + big <= state["memory"]["budget"]


def test_a_busy_runner_is_never_evicted(tiny):
    with RunnerPool(max_loaded=1, load=LOAD) as pool:
        busy = pool.complete(tiny[0], "Once upon a time", **FOREVER)
        assert type(next(busy)) is Chunk
        answer: dict = {}
        other = threading.Thread(target=lambda: answer.update(
            result=pool.complete(tiny[1], "Hi", num_predict=2, temperature=0).text()))
        other.start()
        wait_until(lambda: pool.state()["queues"]["waiting_for_room"] == [tiny[1]])
        for _ in range(20):  # tokens keep coming: the runner was left alone
            assert type(next(busy)) is Chunk
        assert pool.state()["models"][tiny[0]]["in_flight"] == 1
        assert kinds(pool, "evict", "load") == [("load", tiny[0])]
        # A new request for the busy model queues behind the waiting one (no starving it).
        again = threading.Thread(target=lambda: answer.update(
            again=pool.complete(tiny[0], "Hi", num_predict=2, temperature=0).text()))
        again.start()
        wait_until(lambda: pool.state()["queues"]["waiting_for_room"] == [tiny[1], tiny[0]])
        busy.close()  # the lease ends: now it is idle and may go
        other.join()
        again.join()
        assert answer["result"][1].eval_count == 2 and answer["again"][1].eval_count == 2
        assert kinds(pool, "wait", "evict", "load") == [
            ("load", tiny[0]), ("wait", tiny[1]), ("wait", tiny[0]), ("evict", tiny[0]),
            ("load", tiny[1]), ("evict", tiny[1]), ("load", tiny[0])]


def test_a_dead_runner_is_started_again_once_then_reported(tiny):
    model = tiny[0]
    with RunnerPool(load=LOAD) as pool:
        pool.complete(model, "Hi", num_predict=2).text()

        def kill_mid_stream() -> RunnerCrashed:
            stream = pool.complete(model, "Hi", **FOREVER)
            next(stream)
            os.kill(pool.state()["models"][model]["pid"], signal.SIGKILL)
            with pytest.raises(RunnerCrashed) as caught:
                for _ in stream:
                    pass
            return caught.value

        first = kill_mid_stream()
        assert "SIGKILL" in str(first) and "starts it again" in str(first)
        assert pool.state()["models"].get(model) is None
        second = kill_mid_stream()  # the next request started it again
        assert "SIGKILL" in str(second)
        with pytest.raises(ModelFailed, match="failed 2 times in a row .*SIGKILL.*SIGKILL"):
            pool.complete(model, "Hi")
        assert pool.state()["models"][model]["state"] == "failed"
        assert len(kinds(pool, "load")) == 2  # the first start and one restart only

        pool.reset(model)
        assert pool.complete(model, "Hi", num_predict=2).text()[1].eval_count == 2
        # A runner that dies while idle is noticed by the pool and started again.
        pid = pool.state()["models"][model]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: model not in pool.state()["models"])
        assert pool.complete(model, "Hi", num_predict=2).text()[1].eval_count == 2
        assert pool.state()["models"][model]["pid"] != pid


def test_both_stream_flavours_end_their_lease_alike(tiny):
    """PoolStream and AsyncPoolStream share their lease handling: the Final
    ends the lease (before the stream's end), an error reply ends it with
    the runner kept, and a runner that dies mid-stream raises RunnerCrashed."""
    model = tiny[0]

    def in_flight(pool: RunnerPool) -> int:
        return pool.state()["models"][model]["in_flight"]

    with RunnerPool(load=LOAD) as pool:
        stream = pool.complete(model, "Hi", num_predict=2, temperature=0)
        while type(next(stream)) is not Final:
            pass
        assert in_flight(pool) == 0
        with pytest.raises(BadRequest, match="empty"):
            pool.complete(model, "", num_predict=2).text()
        assert in_flight(pool) == 0 and kinds(pool, "crashed", "unhealthy") == []
        stream = pool.complete(model, "Hi", **FOREVER)
        next(stream)
        os.kill(pool.state()["models"][model]["pid"], signal.SIGKILL)
        with pytest.raises(RunnerCrashed, match="SIGKILL"):
            for _ in stream:
                pass

    async def main() -> None:
        async with RunnerPool(load=LOAD) as pool:
            stream = await pool.acomplete(model, "Hi", num_predict=2, temperature=0)
            async for event in stream:
                if type(event) is Final:
                    break
            assert in_flight(pool) == 0
            with pytest.raises(BadRequest, match="empty"):
                await (await pool.acomplete(model, "", num_predict=2)).text()
            assert in_flight(pool) == 0 and kinds(pool, "crashed", "unhealthy") == []
            stream = await pool.acomplete(model, "Hi", **FOREVER)
            await stream.__anext__()
            os.kill(pool.state()["models"][model]["pid"], signal.SIGKILL)
            with pytest.raises(RunnerCrashed, match="SIGKILL"):
                async for _ in stream:
                    pass

    asyncio.run(main())


def test_keep_alive_unloads_idle_runners(tiny):
    with RunnerPool(keep_alive=0.3, load=LOAD) as pool:
        pool.complete(tiny[0], "Hi", num_predict=2).text()
        pool.complete(tiny[1], "Hi", num_predict=2, keep_alive=3600).text()  # its own keep-alive
        wait_until(lambda: tiny[0] not in pool.state()["models"])
        assert kinds(pool, "expire", "unloaded") == [("expire", tiny[0]), ("unloaded", tiny[0])]
        assert pool.state()["models"][tiny[1]]["state"] == "ready"


def test_what_can_never_fit_or_load_fails_at_once(tiny, tmp_path):
    with RunnerPool(memory_budget=1 << 20, load=LOAD) as pool:
        with pytest.raises(DoesNotFit, match=r"needs \d+\.\d MiB, more than the pool's memory budget "
                                             r"of 1\.0 MiB"):
            pool.complete(tiny[0], "Hi")
        assert kinds(pool, "load") == []
    broken = tmp_path / "broken.gguf"
    data = Path(tiny[0]).read_bytes()
    broken.write_bytes(data[: len(data) - 4096])  # the header whole, the tensor data cut short
    with RunnerPool(load=LOAD) as pool:
        with pytest.raises(GGUFError, match="truncated"):  # the estimate reads it: no process
            pool.complete(str(broken), "Hi")
        assert kinds(pool, "refuse", "load") == [("refuse", str(broken))]
        # A load the runner refuses (a LoRA file that is not there) counts as a failure.
        pool.configure(tiny[1], lora_paths=[str(tmp_path / "missing-lora.gguf")])
        for _ in range(2):
            with pytest.raises(ModelLoadError, match="loading .*tiny-1.gguf.* failed: load failed: LoRA adapter not found: .*missing-lora"):
                pool.complete(tiny[1], "Hi")
        with pytest.raises(ModelFailed, match="failed 2 times in a row"):
            pool.complete(tiny[1], "Hi")
        with pytest.raises(ValueError, match="n_ctx"):
            pool.configure(tiny[0], n_ctx=-1)


def test_a_caller_that_gives_up_while_the_model_loads_holds_nothing(tiny):
    async def ready(pool: RunnerPool, model: str) -> dict:
        for _ in range(3000):
            entry = pool.state()["models"].get(model)
            if entry and entry["state"] == "ready":
                return entry
            await asyncio.sleep(0.02)
        raise AssertionError(f"{model} did not load")

    async def main() -> None:
        async with RunnerPool(load=LOAD) as pool:
            task = asyncio.create_task(pool.acomplete(tiny[0], "Hi"))
            while not pool.state()["queues"]["waiting_for_load"]:
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (await ready(pool, tiny[0]))["in_flight"] == 0
            with pytest.raises(TimeoutError, match="no runner for .*tiny-1.gguf"):
                pool.complete(tiny[1], "Hi", timeout=0)  # the load has only just begun
            assert (await ready(pool, tiny[1]))["in_flight"] == 0
            stream = await pool.acomplete(tiny[1], "Hi", **FOREVER)
            assert type(await stream.__anext__()) is Chunk
            stream.close()  # dropped mid-stream: the lease ends with it
            assert pool.state()["models"][tiny[1]]["in_flight"] == 0

    asyncio.run(main())


def test_images_reach_a_pooled_multimodal_runner(default_model_path, tmp_path):
    from mmproj import png_bytes, write_vision_projector

    model = str(default_model_path)
    with RunnerPool(load=LOAD) as pool:
        pool.configure(model, n_ctx=1024, projector_path=str(write_vision_projector(tmp_path / "v.gguf")))
        text, final = pool.complete(model, "Describe [img-0] briefly.", media=[png_bytes(32, 32)],
                                    num_predict=2, temperature=0).text()
        with pool.hold(model) as runner:
            words = len(runner.tokenize("Describe  briefly.", add_special=True))
        assert final.eval_count == 2 and final.prompt_count > words  # the image's rows are in the prompt
        assert pool.state()["models"][model]["need"] > need(model)


def test_streams_for_two_models_through_one_runner_slot_all_finish(tiny):
    """max_loaded=1 and requests for both models at once, from threads and a
    loop: they take turns (no request starves, none is lost, no lease leaks)."""
    finals: list = []

    with RunnerPool(max_loaded=1, load=LOAD) as pool:
        def ask(i: int) -> None:
            for j in range(2):
                finals.append(pool.complete(tiny[(i + j) % 2], f"t{i}", num_predict=3 + i,
                                            temperature=0).text()[1])

        async def aask(i: int) -> None:
            stream = await pool.acomplete(tiny[i % 2], f"a{i}", num_predict=2, temperature=0)
            finals.append((await stream.text())[1])

        async def loop() -> None:
            await asyncio.gather(*(aask(i) for i in range(4)))

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        asyncio.run(loop())
        for t in threads:
            t.join()
        state = pool.state()
    assert sorted(f.eval_count for f in finals) == sorted([3, 3, 4, 4, 5, 5, 6, 6, 2, 2, 2, 2])
    assert state["queues"] == {"waiting_for_room": [], "waiting_for_load": {}}
    assert all(m.get("in_flight", 0) == 0 for m in state["models"].values())


def test_chats_through_the_pool_equal_the_runners_own(default_model_path):
    """pool.chat / achat are Runner.chat / achat on the leased runner: the
    same greedy answer, parsed into the final's message; the lease is given
    back at the end, and a bad chat fails that request only."""
    model = str(default_model_path)
    messages = [{"role": "system", "content": "Answer in one short sentence."},
                {"role": "user", "content": "What is the capital of France? ☕"}]
    with RunnerPool(load=LOAD) as pool:
        text, final = pool.chat(model, messages, num_predict=12, temperature=0).text()
        with pool.hold(model) as runner:
            want, want_final = runner.chat(messages, num_predict=12, temperature=0).text()
        assert text == want and final.message == want_final.message
        assert final.message is not None and final.message.content.strip() == text.strip()

        async def main():
            return await (await pool.achat(model, messages, num_predict=12, temperature=0)).text()

        assert asyncio.run(main())[0] == want
        with pytest.raises(BadRequest):
            pool.chat(model, [{"role": "user", "content": 7}]).text()
        assert pool.state()["models"][model]["in_flight"] == 0
