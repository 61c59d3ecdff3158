"""A load's progress reports (shim/load_progress.py) and how the llm plugin shows them."""

from __future__ import annotations

import asyncio
import io

from omninode_shim.load_progress import ProgressHub

from llm_omninode.llm_model import LoadLine, load_text


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_load_line_shows_on_a_terminal_only_and_is_erased():
    report = {"status": "loading", "stages": 2, "loaded": 1, "fetched": 3 << 20,
              "total": 6 << 20}  # fmt: skip
    assert load_text("smollm2", report) == "omni: loading smollm2: 1/2 stages, 3.0/6.0 MiB fetched"
    assert (
        load_text("m", {"stages": 2, "loaded": "x", "total": -1}) == "omni: loading m: 0/2 stages"
    )
    tty, pipe = Terminal(), io.StringIO()
    for err in (tty, pipe):
        line = LoadLine("smollm2", err)
        line.show(report)
        line.show(report | {"loaded": 2})
        line.clear()
        line.clear()
    assert tty.getvalue() == (
        "\r\x1b[Komni: loading smollm2: 1/2 stages, 3.0/6.0 MiB fetched"
        "\r\x1b[Komni: loading smollm2: 2/2 stages, 3.0/6.0 MiB fetched\r\x1b[K"
    )
    assert pipe.getvalue() == ""  # a log or a pipe gets nothing


def test_a_load_reports_to_its_listeners_and_outlives_a_failing_one():
    async def main():
        hub, heard = ProgressHub(), []

        async def good(report):
            heard.append(report)

        async def gone(report):
            raise ConnectionResetError("client went away")

        with hub.listen("m", good), hub.listen("m", gone), hub.listen("other", good):
            async with hub.loading("m", 2) as watch:
                watch.stage(0).bytes(5, 10)
                await asyncio.sleep(0.3)  # one report interval
                watch.stage(0).bytes(10, 10)
                watch.stage(0).loaded = watch.stage(1).loaded = True
        async with hub.loading("m", 1):  # nobody listens any more
            pass
        return heard

    heard = asyncio.run(main())
    rows = [(r.loaded, r.fetched, r.total) for r in heard]
    assert rows == [(0, 5, 10), (2, 10, 10)]  # one report per interval, and the last
