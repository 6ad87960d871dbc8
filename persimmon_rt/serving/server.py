"""Running the app under uvicorn, with the shutdown the server promises.

On SIGTERM (or Ctrl-C) the server stops admitting at once: the listening socket closes and requests
arriving on open connections get 503. Requests in flight go on for up to `drain_timeout` seconds; the
scheduler thread then cancels what is left (streams end with an error event), and the process exits.
uvicorn's own graceful-shutdown bound, a little longer, is the backstop.
"""

from __future__ import annotations

import contextlib
import signal
import threading

import uvicorn

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, on_exit_signal):
        super().__init__(config)
        self.on_exit_signal = on_exit_signal

    def handle_exit(self, sig, frame) -> None:
        self.on_exit_signal()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self):
        # uvicorn re-raises the signal after shutting down, which would end the process by the signal; a
        # server that drained cleanly exits with status 0 instead.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in _SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def make_server(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> Server:
    state = app.state.serve
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=state.drain_timeout + 5)
    return Server(config, state.drain)
