"""Federated dropout on Flower's simulation runtime (`flwr run`): real NeMo clients, faults, atomic checkpoints, exact resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import nemo_layerfx  # noqa: F401
from nemo_layerfx.fl import runtime
from nemo_layerfx.models import restore
from nemo_layerfx.fl.task import (
    FLConfig, check_run, load_checkpoint, pass_size, save_checkpoint, train_submodel,
)
from nemo_layerfx.train import model_class

pytestmark = pytest.mark.slow  # end-to-end: left out of `scripts/test.sh --fast`

REPO = Path(__file__).resolve().parents[1]
FAULTS = ["++client_app=tests.fl_faults:make_client_app",  # the test-only client: ours with faults injected
          "++client_options={faults: {client0_round1: shape, client1_round1: nan, client0_round2: crash}}"]


@pytest.fixture(scope="module")
def global_nemo(corpus, tmp_path_factory) -> Path:
    from conftest import TINY
    from nemo_layerfx.train import compose_config

    folder = tmp_path_factory.mktemp("fl_model")
    cfg = compose_config("conformer_gn_tiny", TINY + ["model.encoder.n_heads=4", f"corpus_dir={corpus}",
                                                      f"exp_manager.exp_dir={folder}"])
    torch.manual_seed(0)
    path = folder / "global.nemo"
    model_class(cfg)(cfg=cfg.model).save_to(str(path))
    return path


def fl_command(model: Path, corpus: Path, out: Path, rounds: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "nemo_layerfx.cli", "fl", "--config-name", "fd_flat", f"model={model}",
            f"corpus={corpus}", f"out={out}", f"rounds={rounds}", "num_clients=2", "local_steps=2", "batch_size=4",
            "dev_max_utterances=6", "plan.rate=0.5", "plan.kinds=[ffn,head,conv]", "server_opt=fedadam",
            "server_lr=0.01", "freeze.names=[front_end]", *extra]  # partial-variable training: subsampling frozen


ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=ENV)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def whole(global_nemo, corpus, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The uninterrupted simulation: 2 rounds, 2 speaker clients, three faults; (out folder, the command)."""
    out = tmp_path_factory.mktemp("fl") / "whole"
    return out, run(fl_command(global_nemo, corpus, out, 2, *FAULTS))


@pytest.mark.integration
def test_federated_run_drops_faulty_clients_and_a_killed_run_resumes_to_the_same_weights(global_nemo, corpus, whole,
                                                                                        tmp_path):
    # 1. uninterrupted
    whole, done = whole
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    history = rows(whole)
    assert [r["round"] for r in history] == [0, 1, 2]
    assert [[d["client"] for d in r["dropped"]] for r in history[1:]] == [[0, 1], [0]]
    reasons = [d["reason"] for r in history[1:] for d in r["dropped"]]
    assert reasons[0].startswith("wrong shape for encoder.layers.0.feed_forward1.linear1.weight")
    assert reasons[1].startswith("non-finite values in encoder.layers.0.feed_forward1.linear1.weight")
    assert "crashed in round 2" in reasons[2]
    # round 1 had no usable update (the global model stayed as it was); in round 2 the other client was aggregated
    assert [[c["client"] for c in r["clients"]] for r in history[1:]] == [[], [1]]
    client = history[2]["clients"][0]
    assert client["bytes_up"] == client["bytes_down"] > 0 and client["examples"] > 0
    assert all(0.0 <= r["dev_wer"] for r in history)
    assert "round 2: dev WER" in done.stdout
    # the command keeps NeMo's and Lightning's info logs quiet, also those of Flower's ServerApp and client actors
    assert "[NeMo I" not in done.stdout + done.stderr and "GPU available" not in done.stdout + done.stderr
    # nor Flower's ("INFO :" with or without colour codes; its console level is WARNING in our commands)
    assert not re.search(r"INFO \S*:", done.stdout + done.stderr)
    assert (whole / "metrics.png").stat().st_size > 5000
    trained = restore(whole / "global.nemo").state_dict()
    final = torch.load(whole / "checkpoint.pt", weights_only=True)
    assert final["round"] == 2
    start = restore(global_nemo).state_dict()
    moved = [k for k in start if "encoder.layers" in k and not torch.equal(start[k], final["global"][k])]
    assert moved, "two rounds of federated training left the global encoder unchanged"
    # partial-variable training: the frozen subsampling never moved nor travelled
    frozen = [k for k in start if k.startswith("encoder.pre_encode.")]
    assert frozen and all(torch.equal(start[k], final["global"][k]) for k in frozen)
    # each way, fewer bytes than the submodel's float32 parameters alone (a whole submodel's record holds more): the
    # replies were aggregated, so they held exactly the trained tensors the strategy sent
    assert client["bytes_up"] == client["bytes_down"] < client["params"] * 4
    assert all(torch.equal(trained[k], final["global"][k]) for k in trained)  # global.nemo = last checkpoint

    # 2. the same run killed (SIGKILL, whole process group) once round 1 is checkpointed, then resumed
    killed = tmp_path / "killed"
    proc = subprocess.Popen(fl_command(global_nemo, corpus, killed, 2, *FAULTS), cwd=REPO, env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (killed / "metrics.jsonl").is_file() and len(rows(killed)) >= 2:
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    at_kill = torch.load(killed / "checkpoint.pt", weights_only=True)["round"]
    assert at_kill == 1, f"the kill came too late (round {at_kill} was checkpointed)"
    scored = len(rows(killed))
    time.sleep(4)  # nothing runs on: Flower's ServerApp process (in a session of its own) ended with the command
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["round"] == at_kill
    assert len(rows(killed)) == scored
    resumed = run(fl_command(global_nemo, corpus, killed, 2, *FAULTS))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    again = torch.load(killed / "checkpoint.pt", weights_only=True)
    assert again["round"] == 2
    assert all(torch.equal(final["global"][k], again["global"][k]) for k in final["global"]), \
        "the resumed run did not reach the uninterrupted run's weights"
    assert [r["round"] for r in rows(killed)] == [0, 1, 2]
    assert [r["dev_wer"] for r in rows(killed)] == [r["dev_wer"] for r in history]


# --- a deployment: SuperLink and SuperNodes as separate processes on localhost, TLS, authenticated SuperNodes -------
def make_certs(folder: Path) -> runtime.TLS:
    """A throwaway CA and a SuperLink certificate for 127.0.0.1 / localhost, made offline with openssl."""
    folder.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=layerfx-test-ca")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "link.key", "-out", "link.csr", "-subj", "/CN=localhost")
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "link.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out",
            "link.pem", "-days", "2", "-extfile", "san.ext")
    return runtime.TLS(ca=folder / "ca.pem", cert=folder / "link.pem", key=folder / "link.key")


class Deployment:
    """A SuperLink (TLS, SuperNode authentication, state in a file) and ``n`` registered SuperNodes, each its own
    process, as an operator would start them (the README's commands)."""

    def __init__(self, folder: Path, n: int):
        self.folder, self.home, self.n = folder, folder / "flwr", n
        self.tls = make_certs(folder / "certs")
        (folder / "keys").mkdir()
        self.keys = [runtime.supernode_key(folder / "keys", f"node{i}") for i in range(n)]
        self.port = runtime.free_port()
        self.start_link()
        runtime.connect(self.home, "deployment", self.port, self.tls)
        for _, public in self.keys:
            runtime.flwr(self.home, "supernode", "register", str(public), "deployment")
        self.nodes = [self.start_node(i) for i in range(n)]

    def start_link(self) -> None:
        self.link, _ = runtime.start_superlink(self.home, simulation=False, tls=self.tls, port=self.port,
                                               database=str(self.folder / "state.db"), supernode_auth=True)

    def start_node(self, i: int) -> runtime.Process:
        return runtime.start_supernode(self.folder / f"node{i}", self.port, i, self.n, tls=self.tls,
                                       auth_key=self.keys[i][0])

    def stop(self) -> None:
        for p in [*self.nodes, self.link]:
            p.stop()


@pytest.fixture
def deployment(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", ENV["PYTHONPATH"])  # the ClientApp processes import tests.fl_faults
    monkeypatch.setenv("FLWR_LOG_LEVEL", "INFO")  # the SuperNodes log each message they get (a quieted test may
    # have left WARNING in this process's environment)
    d = Deployment(tmp_path / "deployment", 2)
    yield d
    d.stop()


@pytest.mark.integration
def test_a_deployment_with_tls_and_authenticated_supernodes_trains_as_the_simulation_does(whole, deployment, tmp_path):
    whole, done = whole
    assert done.returncode == 0, done.stderr[-2000:]
    saved = torch.load(whole / "checkpoint.pt", weights_only=True)
    cfg = FLConfig(**{**saved["config"], "out": str(tmp_path / "deployed")})  # the simulation's run, faults included
    log = runtime.flwr_run(runtime.write_app(cfg, tmp_path / "app"), deployment.home, "deployment", echo=False)
    assert "Successfully started run" in log
    deployed, simulated = rows(tmp_path / "deployed"), rows(whole)
    assert [r["round"] for r in deployed] == [0, 1, 2]
    assert [[d["client"] for d in r["dropped"]] for r in deployed] == [[d["client"] for d in r["dropped"]]
                                                                        for r in simulated]
    assert "crashed in round 2" in deployed[2]["dropped"][0]["reason"]
    assert [[c["examples"] for c in r["clients"]] for r in deployed] == \
        [[c["examples"] for c in r["clients"]] for r in simulated]
    final = torch.load(tmp_path / "deployed" / "checkpoint.pt", weights_only=True)["global"]
    diff = max(float((final[k].float() - saved["global"][k].float()).abs().max()) for k in final)
    # the same seeds, submodels and order of aggregation; the client processes may use more threads than the
    # simulation's one-core actors, so float sums can round differently (measured 3.0e-8, one float32 step)
    assert diff < 1e-6, f"the deployment's global model differs from the simulation's by {diff}"
    # only the deployment's parties get in: a client that does not trust the CA, or an unregistered SuperNode
    (tmp_path / "plain").mkdir()
    runtime.connect(tmp_path / "plain", "deployment", deployment.port)  # insecure = true
    with pytest.raises(RuntimeError, match="failed"):
        runtime.flwr(tmp_path / "plain", "ls", "deployment")


def processes_with(*words: str) -> list[int]:
    """The pids of live processes whose command line holds every word."""
    found = []
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmd.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if all(any(w in a for a in args) for w in words) and not runtime.process_gone(int(cmd.parent.name)):
            found.append(int(cmd.parent.name))
    return found


def wait_until(condition, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


@pytest.mark.integration
def test_a_deployment_survives_a_killed_supernode_and_a_restarted_superlink(deployment, global_nemo, corpus, tmp_path):
    out = tmp_path / "out"
    cfg = FLConfig(model=str(global_nemo), corpus=str(corpus), out=str(out), rounds=2, num_clients=2, local_steps=1,
                   batch_size=4, dev_max_utterances=6)
    app = runtime.write_app(cfg, tmp_path / "app")
    first: list = []
    runner = threading.Thread(target=lambda: first.append(
        pytest.raises(RuntimeError, runtime.flwr_run, app, deployment.home, "deployment", echo=False)))
    runner.start()
    # 1. SuperNode 1 dies (SIGKILL) once it has its round-1 submodel: the round completes with SuperNode 0 when the
    #    SuperLink declares node 1 unavailable (its heartbeat lapses: up to a minute), and says so in the log
    node1 = deployment.nodes[1]
    wait_until(lambda: node1.tail(100_000).count("Received successfully") >= 2, "node 1's round-1 message")
    node1.stop(signal.SIGKILL)
    wait_until(lambda: (out / "metrics.jsonl").is_file() and len(rows(out)) >= 2, "round 1")
    round1 = rows(out)[1]
    assert [c["client"] for c in round1["clients"]] == [0]
    assert [d["client"] for d in round1["dropped"]] == [1] and "client error" in round1["dropped"][0]["reason"]
    # Flower 1.42 starts a SuperNode's ClientApp processes without a parent monitor: one that had not yet pulled its
    # message when the SuperNode died retries forever (ours end themselves once they run: watch_parents)
    for pid in processes_with("flwr-clientapp", f"127.0.0.1:{node1.args[node1.args.index('--port') + 1]}"):
        os.kill(pid, signal.SIGKILL)
    # 2. the SuperLink crashes (SIGKILL) during round 2; restarted on its database, SuperNode 1 back, `flwr run` again
    deployment.link.stop(signal.SIGKILL)
    runner.join(timeout=120)
    assert first and first[0].type is RuntimeError  # that `flwr run` lost its SuperLink
    at_crash = torch.load(out / "checkpoint.pt", weights_only=True)["round"]
    assert at_crash == 1
    time.sleep(3)  # the crashed run's ServerApp ended with its SuperLink: nothing is written any more
    assert torch.load(out / "checkpoint.pt", weights_only=True)["round"] == at_crash and len(rows(out)) == 2
    deployment.start_link()
    deployment.nodes[1] = deployment.start_node(1)
    log = runtime.flwr_run(app, deployment.home, "deployment", echo=False)
    assert "Successfully started run" in log
    history = rows(out)
    assert [r["round"] for r in history] == [0, 1, 2]  # nothing lost, nothing done twice
    assert [c["client"] for c in history[2]["clients"]] == [0, 1]  # node 1 rejoined
    assert torch.load(out / "checkpoint.pt", weights_only=True)["round"] == 2


@pytest.mark.unit
def test_a_flower_process_ends_with_its_parent_even_when_nothing_reaps_that(tmp_path):
    # parent -> child (watch_parents) ; the parent is SIGKILLed and its own parent, this test, does not reap it yet:
    # a zombie, which Flower's monitor takes for alive
    code = ("import os, subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'from nemo_layerfx.fl.runtime import watch_parents; "
            "watch_parents(); import time; time.sleep(120)'])\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO,
                              start_new_session=True)
    child = int(parent.stdout.readline())
    time.sleep(3)  # the child is watching
    assert not runtime.process_gone(child)
    os.kill(parent.pid, signal.SIGKILL)
    wait_until(lambda: runtime.process_gone(parent.pid), "the parent to die", 10)
    assert Path(f"/proc/{parent.pid}").exists()  # a zombie: exited, not reaped
    wait_until(lambda: runtime.process_gone(child), "the child to end with its parent", 10)
    parent.wait()


@pytest.mark.integration
def test_bad_federated_inputs_fail_before_any_round(global_nemo, corpus, tmp_path, tiny_cfg):
    base = dict(model=str(global_nemo), corpus=str(corpus), out=str(tmp_path / "out"), num_clients=2)
    with pytest.raises(FileNotFoundError, match="no such global model"):
        check_run(FLConfig(**{**base, "model": str(tmp_path / "missing.nemo")}))
    with pytest.raises(ValueError, match=r"flat rate|a dropout rate is the fraction of units dropped, in \[0, 1\)"):
        check_run(FLConfig(**base, plan={"type": "flat", "rate": 1.0, "kinds": ["ffn"]}))
    report = tmp_path / "probe.json"
    report.write_text(json.dumps({"units": [f"layers.{i}" for i in range(5)], "delta_wer": {"rerand": [0.1] * 5}}))
    with pytest.raises(ValueError, match="rates for 5 layers but the encoder has n_layers=2"):
        check_run(FLConfig(**base, plan={"type": "ambient", "n": 2, "rate": 0.5, "report": str(report)}))
    with pytest.raises(ValueError, match="num_clients=9, but .* has 4 client manifests"):
        check_run(FLConfig(**{**base, "num_clients": 9}))
    with pytest.raises(ValueError, match="client_app='fl_faults': give module:function"):
        FLConfig(**base, client_app="fl_faults")
    from nemo_layerfx.fl.client_app import client_app_for

    with pytest.raises(ValueError, match="client_app='no_such_module:app': cannot load it"):
        client_app_for(FLConfig(**base, client_app="no_such_module:app"))
    with pytest.raises(ValueError, match=r"micro_batch_size=3 must divide batch_size=8 .*one of \[1, 2, 4, 8\]"):
        FLConfig(**base, micro_batch_size=3)
    with pytest.raises(ValueError, match="unknown freeze key"):
        FLConfig(**base, freeze={"layers": [0]})
    with pytest.raises(ValueError, match="no parameter of the model starts with 'encoder.nope.'"):
        check_run(FLConfig(**base, freeze={"names": ["encoder.nope"]}))
    with pytest.raises(ValueError, match="unknown aggregation rule 'median'"):
        check_run(FLConfig(**base, rule="median"))
    bn = tiny_cfg("conformer_gn_tiny", "model.encoder._target_=nemo.collections.asr.modules.ConformerEncoder",
                  "model.encoder.conv_norm_type=batch_norm")
    model_class(bn)(cfg=bn.model).save_to(str(tmp_path / "bn.nemo"))
    with pytest.raises(ValueError, match="only GroupNormConformerEncoder layers can be sliced"):
        check_run(FLConfig(**{**base, "model": str(tmp_path / "bn.nemo")}))
    # a corrupt checkpoint, and one from another run, are refused by name
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint.pt is corrupt"):
        load_checkpoint(out, FLConfig(**base))
    cfg = FLConfig(**base)
    save_checkpoint(out, {"round": 1, "config": {**cfg.__dict__, "seed": 5}})
    with pytest.raises(ValueError, match="belongs to a run with seed=5, this run has seed=0"):
        load_checkpoint(out, cfg)
    result = run([sys.executable, "-m", "nemo_layerfx.cli", "fl", f"corpus={corpus}"])
    assert result.returncode == 2 and "model not set" in result.stderr


@pytest.mark.integration
def test_micro_batches_take_the_one_pass_step_and_submodels_take_bigger_passes(tiny_cfg, corpus):
    from nemo_layerfx.fd import DropoutPlan, extract
    from nemo_layerfx.models import clone_model

    # wide and shallow, so that weights weigh in the memory as they do at Conformer-M width on short utterances;
    # nothing random in a pass (no dither, SpecAugment or dropout), so pass shapes alone could change the step
    cfg = tiny_cfg("conformer_gn_tiny", "model.encoder.d_model=256", "model.preprocessor.dither=0.0",
                   "~model.spec_augment",
                   "model.encoder.dropout=0.0", "model.encoder.dropout_pre_encoder=0.0",
                   "model.encoder.dropout_att=0.0")
    torch.manual_seed(0)
    full = model_class(cfg)(cfg=cfg.model)
    sub, _ = extract(full, DropoutPlan.flat(2, 0.5, kinds=("ffn", "head", "conv")), seed=0)
    manifest = corpus / "train_manifest.json"
    fl = dict(model="unused.nemo", corpus=str(corpus), batch_size=4, local_steps=2, client_lr=0.05)
    one, micro = FLConfig(**fl), FLConfig(**fl, micro_batch_size=2)
    # the submodel's pass of 4 holds less than the full model's pass of 2; the full model itself gets no more
    assert pass_size(full, sub, manifest, micro) == 4
    assert pass_size(full, full, manifest, micro) == 2
    assert pass_size(full, sub, manifest, one) == 4
    # two accumulated passes of 2 take the step one pass of 4 takes (2 steps: 8 utterances, within the first epoch)
    a, b = clone_model(full), clone_model(full)
    _, loss_one = train_submodel(a, manifest, one, seed=3)
    _, loss_micro = train_submodel(b, manifest, micro, seed=3, full=full)
    assert loss_micro == pytest.approx(loss_one, rel=1e-5)
    moved = max(float((p - q).abs().max()) for p, q in zip(a.parameters(), full.parameters()))
    diff = max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))
    assert moved > 1e-3 and diff < 1e-5, (moved, diff)
    with pytest.raises(ValueError, match="needs the full model"):
        train_submodel(clone_model(sub), manifest, micro, seed=3)


@pytest.mark.unit
def test_core_runs_without_flower():
    code = ("import sys; sys.modules['flwr'] = None\n"
            "import nemo_layerfx, nemo_layerfx.fd, nemo_layerfx.fl.task\n"
            "from nemo_layerfx.fl import simulate, FLConfig\n"
            "try:\n    simulate(FLConfig(model='m.nemo', corpus='c'))\n"
            "except ImportError as e:\n    print('IMPORT', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert "IMPORT federated runs need Flower: pip install 'nemo_layerfx[federated]'" in out.stdout, out.stderr[-2000:]
