"""Artifact uploads run beside Tune's event loop (orchestrator.uploads): a store that hangs on uploads does not
hold up the trials' results, and every upload still lands once the store answers."""
from __future__ import annotations

import http.client
import http.server
import threading
import time

import pytest

from orchestrator.cli import main
from orchestrator.tracking import parse_tracking
from test_sweep import TWO_TRIALS, runs_of


class HoldingProxy(http.server.ThreadingHTTPServer):
    """An HTTP proxy on 127.0.0.1 in front of an MLflow server that holds every artifact upload (PUT to
    mlflow-artifacts) until `release` is set, and passes everything else straight through. With `refuse_once`,
    it holds nothing and instead answers 403 to the first upload whose path holds that text."""

    daemon_threads = True

    def __init__(self, target_port: int, refuse_once: str | None = None):
        self.target_port, self.release, self.held, self.timed_out = target_port, threading.Event(), 0, 0
        self.refuse_once, self.refused = refuse_once, 0
        if refuse_once:
            self.release.set()
        super().__init__(("127.0.0.1", 0), _Forward)

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Forward(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args) -> None:  # quiet
        pass

    def _forward(self) -> None:
        server: HoldingProxy = self.server  # type: ignore[assignment]
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if (self.command == "PUT" and server.refuse_once and server.refuse_once in self.path
                and not server.refused):
            server.refused += 1
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.command == "PUT" and "mlflow-artifacts" in self.path and not server.refuse_once:
            server.held += 1
            if not server.release.wait(timeout=28):  # just under clorch's MLflow request timeout (30 s)
                server.timed_out += 1
        upstream = http.client.HTTPConnection("127.0.0.1", server.target_port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
        upstream.request(self.command, self.path, body=body, headers=headers)
        reply = upstream.getresponse()
        data = reply.read()
        self.send_response(reply.status)
        for k, v in reply.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        upstream.close()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _forward


def test_codebooks_are_logged_after_every_nth_stage_and_the_last():
    every = parse_tracking({"codebooks": 2})
    assert [s for s in range(5) if every.codebooks_after(s, 5)] == [1, 3, 4]
    assert [s for s in range(5) if parse_tracking({}).codebooks_after(s, 5)] == [0, 1, 2, 3, 4]
    assert not any(parse_tracking({"codebooks": False}).codebooks_after(s, 5) for s in range(5))


def test_the_keys_are_logged_with_the_first_stage_whose_codebooks_are():
    assert [s for s in range(5) if parse_tracking({}).codebooks_with_keys(s, 5)] == [0]
    assert [s for s in range(5) if parse_tracking({"codebooks": 2}).codebooks_with_keys(s, 5)] == [1]
    assert parse_tracking({"codebooks": 9}).codebooks_with_keys(4, 5)  # past the stream: the last stage's


@pytest.mark.slow
def test_a_store_that_hangs_on_uploads_holds_up_no_result_and_every_artifact_lands_later(ray_local, tmp_path,
                                                                                         mlflow_server):
    # the server serves artifacts itself (--artifacts-destination): clients upload them over HTTP, through the proxy
    server = mlflow_server(f"sqlite:///{tmp_path / 'server.db'}")
    proxy = HoldingProxy(server.port)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    path = tmp_path / "uploads.yaml"
    path.write_text(TWO_TRIALS.replace("classes_per_stage: 5", "classes_per_stage: 2").replace("[0, 1]", "[0]")
                    .replace("epochs: 20", "epochs: 2"))
    codes = []
    sweep = threading.Thread(target=lambda: codes.append(main(
        ["sweep", str(path), "--name", "u", "--storage", str(tmp_path / "runs"), "--tracking-uri", proxy.uri])))

    def stages_reported() -> int:
        return sum(len(f.read_text().splitlines()) for f in (tmp_path / "runs" / "u").glob("*/result.json"))

    try:
        sweep.start()
        deadline = time.time() + 120
        while stages_reported() < 1 and time.time() < deadline:  # Ray up, the trial under way
            time.sleep(0.1)
        deadline, reported = time.time() + 20, 0
        while reported < 5 and time.time() < deadline:  # the rest of the stream, while uploads hang
            time.sleep(0.1)
            reported = stages_reported()
        # every stage reached Tune while the first codebook upload (after stage 1) was held, and none let go
        # (an upload on Tune's event loop would hold the next results until the store answered)
        assert reported == 5 and proxy.held >= 1 and proxy.timed_out == 0, (reported, proxy.held, proxy.timed_out)
        proxy.release.set()
        sweep.join(timeout=120)
        assert codes == [0]
        client, (parent,), (child,) = runs_of(proxy.uri, "u")
        assert parent.info.status == "FINISHED" and child.info.status == "FINISHED"
        codebooks = {a.path for a in client.list_artifacts(child.info.run_id, "codebooks")}
        assert {f"codebooks/stage_{s}.npz" for s in range(1, 6)} | {"codebooks/keys.npy"} <= codebooks
        assert "accuracy_matrix.json" in {a.path for a in client.list_artifacts(child.info.run_id)}
        models = client.search_logged_models([child.info.experiment_id],
                                             filter_string=f"source_run_id = '{child.info.run_id}'")
        assert len(models) == 1 and str(models[0].status).endswith("READY")  # once, after the store answered
        assert not any((tmp_path / "runs" / ".clorch" / "u" / "uploads").glob("*"))  # the spool is emptied
    finally:
        proxy.release.set()
        proxy.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("refused", ["accuracy_matrix.json", "keys.npy", "stage_2.npz"])
def test_an_artifact_the_store_refused_is_logged_at_the_sweeps_end(ray_local, tmp_path, mlflow_server, refused):
    """An artifact upload that fails is a warning; the run must not end without its matrices, last codebooks
    or keys for it (as in an outage, a full upload queue, or a driver killed with the upload queued): the
    sweep's end logs what a finished run lacks. Two stages: the keys go with stage 1's codebooks."""
    server = mlflow_server(f"sqlite:///{tmp_path / 'server.db'}")
    proxy = HoldingProxy(server.port, refuse_once=refused)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    path = tmp_path / "refused.yaml"
    path.write_text(TWO_TRIALS.replace("[0, 1]", "[0]")
                    .replace("epochs: 20", "epochs: 1"))
    try:
        assert main(["sweep", str(path), "--name", "r", "--storage", str(tmp_path / "runs"),
                     "--tracking-uri", proxy.uri]) == 0
        assert proxy.refused == 1  # the trial's own upload of its matrices failed
        client, (parent,), (child,) = runs_of(proxy.uri, "r")
        assert child.info.status == "FINISHED"
        files = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"accuracy_matrix.json", "accuracy_matrix_val.png", "accuracy_matrix_test.png"} <= files
        codebooks = {a.path for a in client.list_artifacts(child.info.run_id, "codebooks")}
        assert {"codebooks/keys.npy", "codebooks/stage_2.npz", "codebooks/usage_stage_2.png"} <= codebooks
    finally:
        proxy.shutdown()
