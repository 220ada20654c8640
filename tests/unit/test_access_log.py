"""The router's access log: lines a request closes with reach stderr together, within FLUSH_S, in order."""

import asyncio
import io
import re

from raystack.observability.access_log import FLUSH_S, AccessLog


class Writes(io.StringIO):
    def __init__(self):
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def test_lines_wait_for_one_write_within_the_flush_interval():
    stream = Writes()
    log = AccessLog(stream)

    async def requests_close():
        for status in (200, 429, 499):
            log.write(f"POST /v1/chat/completions {status} 0.010s model=m")
        assert stream.getvalue() == ""  # not yet: one write per interval
        await asyncio.sleep(FLUSH_S + 0.2)

    asyncio.run(requests_close())
    lines = stream.getvalue().splitlines()
    assert stream.writes == 1
    assert [line.split(" -- ")[1] for line in lines] == [
        f"POST /v1/chat/completions {status} 0.010s model=m" for status in (200, 429, 499)]
    assert all(re.match(r"INFO \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} access -- ", line) for line in lines)


def test_without_an_event_loop_a_line_is_written_at_once():
    stream = Writes()
    AccessLog(stream).write("POST /v1/completions 200 0.001s")
    assert stream.getvalue().endswith("access -- POST /v1/completions 200 0.001s\n")
