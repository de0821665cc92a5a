"""Data-parallel runs (torch.distributed, gloo on CPU): DP-SGD and the one-shot release draw their
noise once per step however many processes take part, the ranks' weights stay identical, an error
on rank 0 reaches every rank at once, fit / sample / evaluate in 2 processes write what one process
writes (a user-level fit too), and `torchrun --nproc-per-node 2 -m privsynth fit` certifies what
one process certifies."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from privsynth import distributed
from privsynth.privacy import Budget, Charge, GaussianSum, NoiseSource
from privsynth.privacy.dpsgd import DPSGD, PerSampleGradients, clipped_sum

N, STEPS, SIGMA = 40, 6, 2.0  # the DP-SGD worker's data size, steps and noise multiplier
# The tiny privimage recipe of tests/test_privimage.py, as a file.
TINY = """method = "privimage"
[data]
resolution = 8
[privacy]
accountant = "rdp"
[privimage]
draft = "none"
strength = 1.0
width = 8
pretrain_steps = 2
dp_steps = 3
dp_batch = 8
physical_batch = 4
query_epochs = 1
sample_steps = 2
pretrain_batch = 8
noise_draws = 2
"""


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    """(folder, what each rank saw): 2 gloo processes (torch.multiprocessing, no torchrun agent)
    run DP-SGD, a sharded release, a refused fit and a fit -> sample -> evaluate. One spawn
    serves the tests below."""
    from conftest import make_folder
    from test_privacy_units import PEOPLE, _people

    tmp = tmp_path_factory.mktemp("ranks")
    make_folder(tmp / "private", per_class=10, size=8)
    _people(tmp / "people", PEOPLE, metadata=True)  # 12 images of 4 persons
    make_folder(tmp / "public", per_class=4, classes=tuple("abcde"), size=12, seed=3)
    (tmp / "taken").mkdir()
    (tmp / "taken" / "file").write_text("x")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_rank, args=(port, tmp), nprocs=2, join=True)
    return tmp, [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _rank(rank: int, port: int, tmp: Path) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), **{distributed.TIMEOUT_ENV: "60"})
    torch.set_num_threads(1)
    with distributed.session():
        seen = {**_dpsgd_worker(), **_release_worker(), **_refusal_worker(tmp),
                **_pipeline_worker(tmp)}
    torch.save(seen, tmp / f"rank{rank}.pt")


@contextlib.contextmanager
def _one_thread():
    """One torch thread, as in each test process: float rounding depends on the thread count,
    and on this busy 2-core machine a second thread mostly waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class CountingNoise(NoiseSource):
    """A NoiseSource that counts its draws."""

    def __init__(self) -> None:
        super().__init__()
        self.draws = 0

    def normal(self, shape: tuple[int, ...], std: float) -> np.ndarray:
        self.draws += 1
        return super().normal(shape, std)


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 5, generator=g), torch.randint(0, 3, (N,), generator=g)


def _loss(net, x, y):
    return torch.nn.functional.cross_entropy(net(x), y, reduction="none")


def _train(sigma: float, batches=None, noise: NoiseSource | None = None, sharded: bool = True):
    """DP-SGD on a linear model over `_data()`; (weights, batches used, mechanism)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(5, 3)
    charge = Charge("test.dpsgd", sigma, 0.5, STEPS, 0.5, "test")
    budget = Budget(epsilon=1e9, delta=1e-5, accountant="rdp", charges=[charge])
    mech = DPSGD(budget, charge, expected_batch=N * 0.5, noise=noise or NoiseSource(),
                 sharded=sharded)
    grads = PerSampleGradients(model, "vmap")
    opt = torch.optim.SGD(grads.params, lr=0.5)
    x, y = _data()
    used = []
    for batch in (batches if batches is not None else mech.batches(N)):
        used.append(batch)
        mine = distributed.shard(batch) if sharded else batch
        summed = clipped_sum(grads(_loss, x[mine], y[mine]), charge.sensitivity)
        for p, g in zip(grads.params, mech.noisy_gradient(summed)):
            p.grad = g
        opt.step()
    return [p.detach().clone() for p in model.parameters()], used, mech


def _dpsgd_worker() -> dict:
    noise = CountingNoise()
    weights, batches, _ = _train(SIGMA, noise=noise)
    exact, exact_batches, _ = _train(0.0)  # no noise: the update is a function of the batches
    zero = [torch.zeros(100, 100)]  # a zero gradient: what comes back is the noise alone
    charge = Charge("test.zero", SIGMA, 0.5, 1, 1.0, "test")
    mech = DPSGD(Budget(epsilon=1e9, delta=1e-5, accountant="rdp", charges=[charge]), charge,
                 expected_batch=1.0, noise=NoiseSource(), sharded=True)
    noise_only = mech.noisy_gradient(zero)[0]
    return {"weights": weights, "batches": [b.tolist() for b in batches], "draws": noise.draws,
            "exact": exact, "exact_batches": [b.tolist() for b in exact_batches],
            "noise_std": float(noise_only.std()), "noise_sum": float(noise_only.sum())}


def test_dpsgd_on_two_ranks_draws_one_batch_and_one_noise_per_step(spawned) -> None:
    zero, one = spawned[1]
    # one Poisson batch over the whole dataset per step, the same on both ranks
    assert zero["batches"] == one["batches"] and len(zero["batches"]) == STEPS
    assert sum(map(len, zero["batches"])) > 0
    # noise drawn by rank 0 only, once per step and parameter tensor (weight, bias)
    assert zero["draws"] == STEPS * 2 and one["draws"] == 0
    # the same noisy gradient on both ranks: the same weights, bit for bit
    for a, b in zip(zero["weights"], one["weights"]):
        assert torch.equal(a, b)
    # the noise of one step has std sigma * C / B (once), not sqrt(2) times that (once per rank)
    assert zero["noise_sum"] == one["noise_sum"]
    assert SIGMA * 0.95 < zero["noise_std"] < SIGMA * 1.05
    # without noise, two ranks' summed shares give the one-process update on the same batches
    alone, _, _ = _train(0.0, batches=[np.array(b, dtype=np.int64) for b in zero["exact_batches"]],
                         sharded=False)
    for a, b in zip(zero["exact"], alone):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


ROWS = torch.arange(24, dtype=torch.float64).reshape(12, 2) / 40  # norms <= 0.8: not clipped


def _release_worker() -> dict:
    slots, mine = torch.arange(12) % 3, distributed.shard(torch.arange(12))
    out = {}
    for sigma in (0.0, SIGMA):
        charge = Charge("test.sum", sigma, 1.0, 1, 1.2, "test")
        noise = CountingNoise()
        mech = GaussianSum(Budget(epsilon=1e9, delta=1e-5, accountant="rdp", charges=[charge]),
                           charge, 3, 2, noise, sharded=True)
        mech.add(ROWS[mine], slots[mine])
        out[sigma], out[f"draws{sigma}"] = mech.release(), noise.draws
    big = Charge("test.big", SIGMA, 1.0, 1, 1.0, "test")
    mech = GaussianSum(Budget(epsilon=1e9, delta=1e-5, accountant="rdp", charges=[big]), big,
                       200, 50, NoiseSource(), sharded=True)
    out["release_noise_std"] = float(mech.release().std())  # no rows added: the noise alone
    return out


def test_sharded_release_sums_the_shares_and_adds_noise_once(spawned) -> None:
    zero, one = spawned[1]
    exact = torch.zeros(3, 2, dtype=torch.float64).index_add_(0, torch.arange(12) % 3, ROWS)
    assert torch.equal(zero[0.0], one[0.0])
    torch.testing.assert_close(zero[0.0], exact)
    assert torch.equal(zero[SIGMA], one[SIGMA])
    assert zero[f"draws{SIGMA}"] == 1 and one[f"draws{SIGMA}"] == 0
    assert SIGMA * 0.95 < zero["release_noise_std"] < SIGMA * 1.05


def _tiny_recipe(**privacy):
    from privsynth import recipe as recipes

    raw = tomllib.loads(TINY)
    raw["privacy"].update(epsilon=4.0, **privacy)
    if privacy:  # user-level: 2 of the 4 persons per step, 2 images of each
        raw["privimage"].update(dp_batch=2, unit_images=2)
    return recipes.resolve(raw)


def _refusal_worker(tmp: Path) -> dict:
    from privsynth import run

    start = time.monotonic()
    try:
        run.fit(tmp / "private", tmp / "public", _tiny_recipe(), tmp / "taken", dataset="refused")
    except Exception as exc:  # noqa: BLE001 - the test looks at what each rank raised
        return {"error": type(exc).__name__, "echo": getattr(exc, "echo_of_rank", None),
                "seconds": time.monotonic() - start}
    return {"error": None}


def test_an_error_on_rank_0_reaches_every_rank_at_once(spawned) -> None:
    """`out` is not empty: rank 0 refuses, and rank 1 raises the same error instead of waiting
    in the next collective (gloo timeout 60 s here; no torchrun agent to stop it)."""
    zero, one = spawned[1]
    assert zero["error"] == one["error"] == "UsageError"
    assert zero["echo"] is None and one["echo"] == 0  # the CLI prints it once, on rank 0
    assert one["seconds"] < 30


def _pipeline_worker(tmp: Path) -> dict:
    from privsynth import evaluate, run

    fitted = run.fit(tmp / "private", tmp / "public", _tiny_recipe(), tmp / "run",
                     dataset="ddp-spawned")
    synthetic = run.sample(tmp / "run", 260, tmp / "syn", seed=5)  # chunks of 250 + 10 rows
    report = evaluate.evaluate(tmp / "private", tmp / "public", tmp / "rep", classifier=None,
                               batch_size=8)  # 3 batches per set, shared out
    people = run.fit(tmp / "people", tmp / "public", _tiny_recipe(unit="column:person"),
                     tmp / "run-people", dataset="ddp-people")
    return {"fitted": fitted and fitted.certificate, "synthetic": synthetic, "report": report,
            "people": people and people.certificate}


def test_fit_sample_evaluate_in_two_processes_write_what_one_process_writes(spawned) -> None:
    from privsynth import evaluate, run
    from privsynth.privacy import ledger as ledgers

    tmp, (zero, one) = spawned
    assert one["fitted"] is None and one["synthetic"] is None and one["report"] is None
    assert zero["fitted"]["mechanisms"][1]["sample_rate"] == pytest.approx(8 / 20)
    book = ledgers.Ledger(ledgers.location(), "ddp-spawned").read()
    assert len(book["entries"]) == 1  # recorded by rank 0 alone
    assert not list(tmp.glob(".*"))  # no work or partial folder left by either rank
    with _one_thread():
        run.sample(tmp / "run", 260, tmp / "syn1", seed=5)
        report = evaluate.evaluate(tmp / "private", tmp / "public", tmp / "rep1", classifier=None,
                                   batch_size=8)
    manifest = (tmp / "syn" / "MANIFEST.sha256").read_text()
    assert manifest == (tmp / "syn1" / "MANIFEST.sha256").read_text()  # the same 260 files
    assert len(manifest.splitlines()) == 260 + 4  # images, metadata, classes, certificate, card
    got, want = zero["report"]["runs"][0], report["runs"][0]
    for key in ("fid", "kid", "precision", "recall"):  # the same features: the same numbers
        assert got[key] == want[key]
    assert len(list((tmp / "rep" / "cache").iterdir())) == 2  # one file per set, rank 0's


def test_user_level_fit_in_two_processes_certifies_what_one_process_certifies(spawned) -> None:
    """privacy.unit=column:person: Poisson sampling over 4 persons, a person's images averaged
    into one clipped row; sharded across 2 processes, the accounting is unchanged."""
    from privsynth import run

    tmp, (zero, one) = spawned
    assert one["people"] is None
    with _one_thread():
        alone = run.fit(tmp / "people", tmp / "public", _tiny_recipe(unit="column:person"),
                        tmp / "run-people-1", dataset="ddp-people-1").certificate
    assert zero["people"]["mechanisms"] == alone["mechanisms"]
    assert zero["people"]["epsilon"] == alone["epsilon"] and zero["people"]["unit"] == alone["unit"]
    assert {m["name"]: m for m in alone["mechanisms"]}["privimage.dpsgd"]["sample_rate"] == 2 / 4


def test_one_process_helpers_are_no_ops() -> None:
    assert distributed.world() == 1 and distributed.rank() == 0 and distributed.is_main()
    x = torch.arange(5.0)
    assert distributed.broadcast(x) is x and distributed.shard([1, 2, 3]) == [1, 2, 3]
    assert distributed.gather("a") == ["a"] and distributed.share(7, "n") == 7
    assert distributed.on_main(lambda a: a + 1, 1) == 2
    model = torch.nn.Linear(2, 2)
    assert distributed.data_parallel(model) is model
    assert distributed.generator(3).initial_seed() == 3  # rank 0's stream: as in one process


def test_torchrun_environment_without_a_session_is_refused(monkeypatch) -> None:
    from privsynth.errors import UsageError

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="session"):
        distributed.world()


def _sampler(method: str):
    from privsynth.generators import dpmepf, privimage
    from privsynth.generators.privimage import unet
    from privsynth.generators.convgen import ConvGenConfig, ConvGenerator

    torch.manual_seed(0)
    if method == "privimage":
        cfg = unet.UNetConfig(classes=3, channels=1, resolution=8, widths=(8, 16),
                              attention=(False, True), groups=4)
        return privimage.Sampler(unet.build(cfg).eval(), cfg, ("a", "b", "c"), [0.5, 0.3, 0.2],
                                 2, 2.0, {})
    net = ConvGenerator(ConvGenConfig(3, 1, 8, latent_dim=4, width=8)).eval()
    return dpmepf.Sampler(net, ("a", "b", "c"), [0.5, 0.3, 0.2])


@pytest.mark.parametrize("method", ["privimage", "dp-mepf"])
def test_shares_of_a_sample_concatenate_to_the_whole_sample(method: str) -> None:
    with _one_thread():  # tiny tensors: a second thread only waits for a busy core
        _shares_concatenate(_sampler(method))


def _shares_concatenate(sampler) -> None:
    whole, labels = sampler.sample(5, seed=3, batch=2)
    assert whole.shape == (5, 1, 8, 8) and whole.dtype == torch.uint8
    for k in (2, 4):  # 3 chunks (2 + 2 + 1 rows): with 4 shares, share 0 is empty
        parts = [sampler.sample(5, seed=3, batch=2, part=(i, k)) for i in range(k)]
        assert torch.equal(torch.cat([p[0] for p in parts]), whole)
        assert torch.equal(torch.cat([p[1] for p in parts]), labels)
    assert parts[0][0].shape == (0, 1, 8, 8) and len(parts[0][1]) == 0
    assert not torch.equal(sampler.sample(5, seed=4, batch=2)[0], whole)


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2 -m privsynth ARGS` (1 thread per process)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **{distributed.TIMEOUT_ENV: "120"})
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "privsynth", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # torchrun's agent and 2 fresh processes; the ranks' logic runs above (spawned)
def test_torchrun_fit_certifies_what_one_process_certifies(tmp_path: Path) -> None:
    from conftest import make_folder
    from typer.testing import CliRunner

    from privsynth.cli import app

    private = make_folder(tmp_path / "private", per_class=10, size=8)
    public = make_folder(tmp_path / "public", per_class=4, classes=tuple("abcde"), size=12, seed=3)
    before = sorted(p.relative_to(private) for p in private.rglob("*"))
    (tmp_path / "tiny.toml").write_text(TINY)
    fit = ["fit", str(private), "--public", str(public), "--epsilon", "4", "--recipe",
           str(tmp_path / "tiny.toml"), "--json"]
    two = _torchrun(*fit, "--out", str(tmp_path / "run2"), "--dataset", "ddp-two")
    assert two.returncode == 0, two.stderr[-3000:]
    summary = json.loads(two.stdout)  # one JSON document: only rank 0 reports
    with _one_thread():
        one = CliRunner().invoke(app, [*fit, "--out", str(tmp_path / "run1"), "--dataset", "ddp-one"])
    assert one.exit_code == 0, one.output
    certs = [json.loads((tmp_path / r / "certificate.json").read_text()) for r in ("run2", "run1")]
    assert certs[0]["mechanisms"] == certs[1]["mechanisms"]  # (sigma, q, T, C) of each stage
    assert certs[0]["epsilon"] == certs[1]["epsilon"] and summary["epsilon"] == certs[1]["epsilon"]["spent"]
    assert certs[0]["mechanisms"][1]["sample_rate"] == pytest.approx(8 / 20)
    ledger = json.loads(CliRunner().invoke(app, ["budget", "ddp-two", "--json"]).output)
    assert [f["status"] for f in ledger["fits"]] == ["completed"]  # one entry, from rank 0
    assert sorted(p.relative_to(private) for p in private.rglob("*")) == before  # nothing written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["private", "public", "run1", "run2",
                                                          "tiny.toml"]  # no work folder left
