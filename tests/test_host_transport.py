"""``host.transport``: URLs are checked for their form before anything is opened, and
every refusal says what would be accepted."""

import socket

import pytest

from host.transport import SerialTransport, TransportError, url_problem


@pytest.mark.parametrize("url,needle", [
    ("socket://127.0.0.1:notaport", "port 'notaport' is not a number"),
    ("socket://127.0.0.1:", "port '' is not a number"),
    ("socket://127.0.0.1:0", "port '0' is out of range"),
    ("socket://127.0.0.1:65536", "port '65536' is out of range"),
    ("socket://127.0.0.1", "socket:// needs HOST:PORT, got '127.0.0.1'"),
    ("socket://:5000", "socket:// needs HOST:PORT, got ':5000'"),
    ("rfc2217://host:x", "port 'x' is not a number"),
])
def test_malformed_socket_urls_are_refused_before_opening(url, needle):
    problem = url_problem(url)
    assert needle in problem and "PORT 1..65535" in problem and "e.g. " in problem
    with pytest.raises(TransportError) as e:
        SerialTransport(url)
    assert str(e.value) == f"cannot open {url!r}: {problem}"


@pytest.mark.parametrize("url", ["socket://127.0.0.1:5000", "socket://localhost:1/?logging=debug",
                                 "rfc2217://10.0.0.2:2217", "/dev/ttyUSB0", "COM3", "loop://"])
def test_well_formed_urls_pass(url):
    assert url_problem(url, device=url != "loop://") is None


def test_loop_is_no_device():
    problem = url_problem("loop://")
    assert "echoes every request back" in problem and "/dev/ttyUSB0" in problem
    assert "socket://HOST:PORT" in problem
    assert url_problem("loop://", device=False) is None
    with SerialTransport("loop://") as t:      # still there for tests of the driver
        t.write(b"abc")
        assert t.read(3, 1.0) == b"abc"


def test_no_listener_says_what_to_check():
    with socket.socket() as s:                 # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TransportError, match="Connection refused; nothing accepts connections"):
        SerialTransport(f"socket://127.0.0.1:{port}")


def test_unknown_scheme_lists_what_is_accepted():
    with pytest.raises(TransportError, match=r"protocol 'bogus' not known; accepted: a serial"):
        SerialTransport("bogus://x")
    assert "no URL given" in url_problem("")


def test_byte_time_follows_the_baud():
    with SerialTransport("loop://", baud=115_200) as t:
        assert t.byte_seconds == pytest.approx(10 / 115_200)
    with SerialTransport("loop://", baud=3_000_000) as t:
        assert t.byte_seconds == pytest.approx(10 / 3_000_000)
    for baud in (0, -9600, 1.5):
        with pytest.raises(TransportError, match=f"baud {baud!r}, accepted an integer >= 1"):
            SerialTransport("loop://", baud=baud)
