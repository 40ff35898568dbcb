"""Several ranks under mlx.launch (ring backend over loopback, CPU): the same greedy tokens as one process in
both modes, each rank holding its share of the layers' weights, all ranks ending when one fails, the same
model on every rank.

Each launch starts Python processes; the module's launches are made once and shared, and carry the
`distributed` mark (`-m "not distributed"` leaves them out).
"""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPException
from pathlib import Path

import pytest
from mlx.utils import tree_flatten

from qwenmlx.checkpoint import load_model
from qwenmlx.distributed import layer_ranges
from tests.checkpoints import TINY_MOE, write_hf_checkpoint
from tests.distributed_rank import PROMPT, greedy_tokens
from tests.serving import API_KEY, Server, http, running_server, script, user, wait_until_healthy

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parent.parent
LAUNCH = Path(sys.executable).parent / "mlx.launch"
RANK_SCRIPT = ROOT / "tests" / "distributed_rank.py"
LAUNCH_TIMEOUT = 300


def free_ports(n: int) -> int:
    """A first port of n consecutive ones that are free now (the ring backend listens on port, port+1, ...)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + n > 65535:
            continue
        try:
            for port in range(first, first + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue


def launch_argv(n: int, first_port: int, *command: str) -> list[str]:
    """`mlx.launch -n N --backend ring` of command, its ranks on the ports from first_port."""
    return [str(LAUNCH), "-n", str(n), "--backend", "ring", "-p", str(first_port), "--", *command]


def launch(n: int, *command: str, stdin: str = "") -> subprocess.CompletedProcess:
    """`mlx.launch -n N --backend ring -- command` from the worktree's root, so the ranks import its qwenmlx.

    mlx.launch hands its stdin to every rank but never closes theirs, so input that a command reads to its
    end must end in a command that ends it (chat's /exit).
    """
    argv = launch_argv(n, free_ports(n), *command)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT,
                          input=stdin)


def run_ranks(n: int, model_dir: Path, mode: str, out_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    out_dir.mkdir(exist_ok=True)
    return launch(n, sys.executable, str(RANK_SCRIPT), str(model_dir), mode, str(out_dir), *extra)


def rank_facts(out_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out_dir.glob("rank*.json"))]


def nbytes(tree) -> int:
    return sum(v.nbytes for _, v in tree_flatten(tree))


@pytest.fixture(scope="module")
def one_process(moe_dir):
    """Greedy tokens of the whole model in one process; each layer's bytes, and its experts' (the part split)."""
    model, _ = load_model(moe_dir)
    return {"tokens": greedy_tokens(model), "layer_bytes": [nbytes(layer.parameters()) for layer in model.layers],
            "expert_bytes": [nbytes(layer.mlp.switch_mlp.parameters()) for layer in model.layers]}


@pytest.fixture(scope="module")
def launched(moe_dir, tmp_path_factory):
    """{(mode, ranks): (mlx.launch's result, each rank's facts)} for 2 and 3 ranks in both modes."""
    runs = {}
    for mode in ("pipeline", "experts"):
        for n in (2, 3):
            out_dir = tmp_path_factory.mktemp(f"{mode}-{n}")
            result = run_ranks(n, moe_dir, mode, out_dir)
            runs[mode, n] = result, rank_facts(out_dir)
    return runs


RUNS = [("pipeline", 2), ("pipeline", 3), ("experts", 2), ("experts", 3)]


@pytest.mark.parametrize("mode, n", RUNS)
def test_every_rank_generates_the_greedy_tokens_of_one_process(launched, one_process, mode, n):
    result, facts = launched[mode, n]
    assert result.returncode == 0, result.stderr
    assert [f["rank"] for f in facts] == list(range(n))
    for f in facts:
        assert f["tokens"] == one_process["tokens"]


@pytest.mark.parametrize("mode, n", RUNS)
def test_each_rank_holds_its_share_of_the_layers_weights_and_nothing_more(launched, one_process, mode, n):
    _, facts = launched[mode, n]
    layers, experts = one_process["layer_bytes"], one_process["expert_bytes"]
    assert len(facts) == n
    for f in facts:
        if mode == "pipeline":
            assert f["layer_bytes"] == sum(layers[i] for i in layer_ranges(len(layers), n)[f["rank"]])
        else:  # 1/n of every expert (to within one row of the intermediate size); attention and router replicated
            assert f["layer_bytes"] == pytest.approx(sum(layers) - sum(experts) + sum(experts) / n, rel=0.05)
        assert f["loaded_bytes"] <= f["weight_bytes"] + 2**20  # no dropped weight kept alive behind a slice


@pytest.fixture(scope="module")
def quantized_moe_dir(tmp_path_factory):
    """A 4-bit checkpoint (groups of 32) whose experts' 96 intermediate rows split into 2 or 3 whole groups."""
    from quantize import get_recipe
    from qwenmlx.convert import convert

    source = write_hf_checkpoint(tmp_path_factory.mktemp("moe-96"), dict(TINY_MOE, moe_intermediate_size=96))
    dst = tmp_path_factory.mktemp("moe-96-q4") / "q4"
    convert(source, dst, get_recipe("q4", 32))
    return dst


LEVERS = [  # (checkpoint, mode, ranks, options): the cache kinds, YaRN, SelfExtend, quantized weights
    ("quantized", "experts", 3, {"kv_bits": 8}),
    ("quantized", "pipeline", 2, {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 8}}),
    ("float", "experts", 2, {"max_kv_size": 12}),
    ("float", "pipeline", 2, {"self_extend": {"group_size": 2, "window": 4}}),
]


@pytest.mark.parametrize("checkpoint, mode, n, options", LEVERS, ids=lambda v: json.dumps(v) if isinstance(v, dict) else str(v))
def test_split_models_keep_every_lever_of_one_process(moe_dir, quantized_moe_dir, tmp_path, checkpoint, mode, n,
                                                      options):
    model_dir = quantized_moe_dir if checkpoint == "quantized" else moe_dir
    model, _ = load_model(model_dir, rope_scaling=options.get("rope_scaling"), self_extend=options.get("self_extend"))
    alone = greedy_tokens(model, options.get("kv_bits"), options.get("max_kv_size"))
    result = run_ranks(n, model_dir, mode, tmp_path / "out", json.dumps(options))
    assert result.returncode == 0, result.stderr
    facts = rank_facts(tmp_path / "out")
    assert [f["tokens"] for f in facts] == [alone] * n


@pytest.mark.parametrize("mode", ["pipeline", "experts"])
def test_every_rank_goes_on_with_rank_0s_sampled_token(moe_dir, tmp_path, mode):
    """Each rank draws from a random state of its own; the tokens all ranks go on with are still rank 0's."""
    result = run_ranks(2, moe_dir, mode, tmp_path / "out", json.dumps({"temperature": 1.0}))
    assert result.returncode == 0, result.stderr
    first, second = rank_facts(tmp_path / "out")
    assert first["tokens"] == second["tokens"]


@pytest.mark.parametrize("mode", ["pipeline", "experts"])
def test_ranks_with_different_free_memory_cut_the_same_prefill_chunks(moe_dir, tmp_path, mode):
    """Rank 0's machine would prefill 2,048 tokens at once, rank 1's only 128: all go by the tightest."""
    model, _ = load_model(moe_dir)
    alone = greedy_tokens(model, prompt=PROMPT * 40)
    options = {"prompt_repeats": 40, "available_memory": [10**12, 10**8]}
    result = run_ranks(2, moe_dir, mode, tmp_path / "out", json.dumps(options))
    assert result.returncode == 0, result.stderr
    assert [f["tokens"] for f in rank_facts(tmp_path / "out")] == [alone, alone]


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_a_failing_rank_ends_every_rank(moe_dir, tmp_path, failing_rank):
    out_dir = tmp_path / "out"
    result = run_ranks(2, moe_dir, "pipeline", out_dir, json.dumps({"fail_rank": failing_rank}))  # or times out
    # mlx.launch exits 0 whatever its ranks did, and names each rank that failed or that it stopped. The failing
    # rank's exit closes its sockets before Python has finished unwinding; the other rank then fails on them, and
    # mlx.launch may stop (SIGTERM) the failing one before it is done: either way it is named.
    assert re.search(f"Node with rank {failing_rank} exited with code (1|-15) ", result.stderr), result.stderr
    assert f"rank {failing_rank} fails on purpose" in result.stderr
    assert rank_facts(out_dir) == []  # the other rank did not go on to finish alone


@pytest.fixture
def moe_dir_other_generation_config(moe_dir, tmp_path):
    """The tiny MoE checkpoint (weights linked) with another generation_config.json."""
    copy = tmp_path / "other-generation-config"
    copy.mkdir()
    for path in moe_dir.iterdir():
        (copy / path.name).symlink_to(path)
    (copy / "generation_config.json").unlink()
    (copy / "generation_config.json").write_text(json.dumps({"temperature": 0.1}))
    return copy


@pytest.mark.parametrize("other", ["moe_dir_other_weights", "moe_dir_other_generation_config"])
def test_ranks_with_different_models_are_refused_naming_the_rank(moe_dir, tmp_path, request, other):
    """Rank 1 is given other weights of the same shapes, or another tokenizer setting: every rank stops before
    generating, naming rank 1."""
    other_dir = request.getfixturevalue(other)
    first = free_ports(2)
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{first}"], [f"127.0.0.1:{first + 1}"]]))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    ranks = []
    for rank, model_dir in enumerate([moe_dir, other_dir]):
        # What mlx.launch sets for each rank, done by hand so the ranks can differ in their arguments.
        env = {**os.environ, "PYTHONPATH": str(ROOT), "MLX_HOSTFILE": str(hostfile), "MLX_RANK": str(rank)}
        ranks.append(subprocess.Popen([sys.executable, str(RANK_SCRIPT), str(model_dir), "pipeline", str(out_dir)],
                                      cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True))
    errors = [p.communicate(timeout=LAUNCH_TIMEOUT)[1] for p in ranks]
    assert [p.returncode for p in ranks] == [1, 1]
    for stderr in errors:
        assert "rank 1 has a different model from rank 0's" in stderr
    assert rank_facts(out_dir) == []


def test_generate_under_mlx_launch_prints_once_with_world_size_and_mode(moe_dir):
    argv = ["-m", "qwenmlx", "generate", "-m", str(moe_dir), "-p", "Hello", "--max-tokens", "6", "--temp", "0",
            "--json", "--no-memory-check"]
    alone = json.loads(subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                                      check=True).stdout)
    result = launch(2, sys.executable, *argv, "--parallel", "experts")
    assert result.returncode == 0, result.stderr
    together = json.loads(result.stdout)  # one JSON document: only rank 0 writes to stdout
    assert (alone["world_size"], alone["parallel"]) == (1, None)
    assert (together["world_size"], together["parallel"]) == (2, "experts")
    assert together["text"] == alone["text"]


def test_layers_split_into_consecutive_runs_covering_each_once():
    for n_layers in (3, 4, 48, 94):
        for size in (1, 2, 3):
            ranges = layer_ranges(n_layers, size)
            assert [i for r in ranges for i in r] == list(range(n_layers))
            assert max(map(len, ranges)) - min(map(len, ranges)) <= 1



def test_chat_under_mlx_launch_answers_as_one_process_from_rank_0s_input(moe_dir, tmp_path):
    """Rank 0 reads the lines and hands them to rank 1; two answers (the second reusing the first's cache) are
    one process's; /stats shows the split; /save is refused."""
    argv = ["-m", "qwenmlx", "chat", "-m", str(moe_dir), "--plain", "--no-think", "--max-tokens", "6",
            "--temp", "0", "--no-memory-check"]
    saved = tmp_path / "chat.json"
    alone = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                           input="Hello there\nAnd again\n/exit\n", timeout=LAUNCH_TIMEOUT)
    together = launch(2, sys.executable, *argv, "--parallel", "pipeline",
                      stdin=f"Hello there\nAnd again\n/stats\n/save {saved}\n/exit\n")
    assert together.returncode == 0, together.stderr
    assert "Node with rank" not in together.stderr  # every rank exited 0

    def answers(stdout: str) -> list[str]:
        return [turn.split("\n")[0] for turn in stdout.split(">>> ")[1:3]]

    assert all(answer.strip() for answer in answers(alone.stdout))
    assert answers(together.stdout) == answers(alone.stdout)
    assert int(re.search(r"(\d+) reused", together.stdout).group(1)) > 0  # the second prompt reused the cache
    assert together.stdout.count("qwenmlx chat") == 1  # only rank 0 writes to the terminal
    assert "split by pipeline" in together.stdout and "communication" in together.stdout
    assert "/save is not available while the model is split over ranks" in together.stdout
    assert not saved.exists()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (its threads' included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_rank_waiting_for_chat_input_sleeps_rather_than_polls(moe_dir):
    """MLX's ring backend polls while a collective waits: a rank left in one while the person thinks would keep
    a core busy. Waiting for the next line, the other rank uses a small part of a core."""
    argv = launch_argv(2, free_ports(2), sys.executable, "-m", "qwenmlx", "chat", "-m", str(moe_dir), "--plain",
                       "--no-think", "--max-tokens", "4", "--temp", "0", "--no-memory-check")
    launcher = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        shown = b""
        while b">>> " not in shown:  # rank 0 waits for the first line (so, through it, does rank 1)
            chunk = os.read(launcher.stdout.fileno(), 4096)
            assert chunk, launcher.stderr.read().decode()
            shown += chunk
        follower = rank_pid(launcher.pid, 1)
        before, idle = cpu_seconds(follower), 3.0
        time.sleep(idle)
        used = cpu_seconds(follower) - before
        launcher.stdin.write(b"/exit\n")
        launcher.stdin.flush()
        assert launcher.wait(timeout=LAUNCH_TIMEOUT) == 0
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    assert used < 0.25 * idle  # polling, it takes most of a core (70-100% here)


def test_summarize_under_mlx_launch_writes_its_summary_once_from_rank_0(moe_dir, tmp_path):
    document, out = tmp_path / "notes.txt", tmp_path / "summary.txt"
    document.write_text("A mixture-of-experts layer routes each token to a few of its experts.\n")
    result = launch(2, sys.executable, "-m", "qwenmlx", "summarize", str(document), "-m", str(moe_dir),
                    "--max-tokens", "6", "--json", "--no-memory-check", "--parallel", "experts", "--out", str(out))
    assert result.returncode == 0 and "Node with rank" not in result.stderr, result.stderr
    facts = json.loads(result.stdout)  # one JSON document: only rank 0 writes to stdout
    assert (facts["world_size"], facts["parallel"]) == (2, "experts")
    assert out.read_text() == facts["summary"] + "\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "summary.txt"]  # no rank's leftovers


def test_a_memory_budget_under_mlx_launch_is_refused_in_one_line(moe_dir):
    """Streamed experts and a rank's share of every expert do not combine yet: said before any weight is read."""
    result = launch(2, sys.executable, "-m", "qwenmlx", "generate", "-m", str(moe_dir), "-p", "Hi",
                    "--memory-budget", "10GB", "--no-memory-check")
    assert "error: --memory-budget: not under mlx.launch" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_prompt_from_stdin_under_mlx_launch_is_refused_rather_than_waited_for(moe_dir):
    """mlx.launch never closes the ranks' stdin, so reading it to its end would never return."""
    result = launch(2, sys.executable, "-m", "qwenmlx", "generate", "-m", str(moe_dir), "-p", "-", stdin="Hello\n")
    assert "error: -p -: under mlx.launch stdin never ends" in result.stderr


@pytest.mark.parametrize("command", [["generate", "-p", "Hello", "--max-tokens", "1000000"], ["chat", "--plain"]],
                         ids=["generating", "chat-waiting-for-a-line"])
def test_ctrl_c_ends_every_rank(moe_dir, command):
    """Ctrl-C sends SIGINT to the terminal's foreground group: mlx.launch and, on this machine, every rank. It ends
    chat too (not only its answer): mlx.launch, stopped by it, no longer hands the terminal's input on."""
    argv = launch_argv(2, free_ports(2), sys.executable, "-m", "qwenmlx", command[0], "-m", str(moe_dir),
                       *command[1:], "--temp", "0", "--no-memory-check", "--parallel", "experts")
    launcher = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, start_new_session=True,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as from a shell
    try:
        launcher.stdout.read(1)  # rank 0 is generating, or has shown chat's banner
        os.killpg(launcher.pid, signal.SIGINT)
        stderr = launcher.communicate(timeout=LAUNCH_TIMEOUT)[1].decode()
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
    for rank in (0, 1):
        assert f"Node with rank {rank} exited with code 130" in stderr


# --- serve: rank 0 answers HTTP, every rank runs the engine in lockstep ---

GREEDY = dict(temperature=0.0, extra_body={"chat_template_kwargs": {"enable_thinking": False}})
REQUESTS = [  # (messages, max_tokens): prompts and answers of different lengths, so the batch changes as they end
    (user("Hello there"), 6),
    (user("Tell me a long story about a dragon, a knight and the village they both defended."), 11),
    (user("Why is the sky blue?"), 16),
]


def answer(server: Server, messages: list[dict], max_tokens: int) -> tuple:
    reply = server.client().chat.completions.create(model="m", messages=messages, max_tokens=max_tokens, **GREEDY)
    return reply.choices[0].message.content, reply.choices[0].finish_reason, reply.usage.completion_tokens


@contextlib.contextmanager
def serving_under_launch(model_dir: Path, log: Path, *options: str) -> Iterator[tuple[Server, subprocess.Popen]]:
    """`qwenmlx serve` on 2 ranks (in a session of its own, as from a terminal), until the block ends."""
    first = free_ports(3)  # the ring's two, then the server's
    argv = launch_argv(2, first, sys.executable, "-m", "qwenmlx", "serve", "-m", str(model_dir), "--port",
                       str(first + 2), "--api-key", API_KEY, "--no-memory-check", *options)
    with open(log, "a") as out:
        launcher = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env={**os.environ, "PYTHONPATH": str(ROOT), "QWENMLX_TEST_HOOKS": "1"},
                                    start_new_session=True)
    try:
        url = f"http://127.0.0.1:{first + 2}"
        wait_until_healthy(url, launcher, log)
        yield Server(url, log), launcher
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()


def ctrl_c(launcher: subprocess.Popen) -> None:
    """Ctrl-C as a terminal sends it (SIGINT to the foreground group: mlx.launch and every rank). mlx.launch ends
    once every rank has, naming each that exited with another code than 0."""
    os.killpg(launcher.pid, signal.SIGINT)
    launcher.wait(timeout=LAUNCH_TIMEOUT)


@pytest.fixture(scope="module")
def one_process_answers(moe_dir, tmp_path_factory):
    """Each request's greedy answer from one process, alone."""
    with running_server(moe_dir, tmp_path_factory.mktemp("serve-alone") / "server.log") as server:
        return [answer(server, *request) for request in REQUESTS]


@pytest.mark.parametrize("mode", ["pipeline", "experts"])
def test_serve_under_mlx_launch_answers_as_one_process_alone_and_batched(moe_dir, tmp_path, one_process_answers,
                                                                         mode):
    """One request, the same again (from the prompt cache), then all at once (decoded as one batch on every rank)."""
    log = tmp_path / "serve.log"
    with serving_under_launch(moe_dir, log, "--parallel", mode) as (server, launcher):
        health = http(f"{server.url}/health")[2]
        assert (health["world_size"], health["parallel"]) == (2, mode)
        assert answer(server, *REQUESTS[0]) == one_process_answers[0]
        assert answer(server, *REQUESTS[0]) == one_process_answers[0]
        with ThreadPoolExecutor(len(REQUESTS)) as pool:
            assert list(pool.map(lambda request: answer(server, *request), REQUESTS)) == one_process_answers
        ctrl_c(launcher)
    assert "Node with rank" not in log.read_text()  # every rank exited 0
    assert log.read_text().count("(Ctrl-C stops)") == 1  # only rank 0 serves


def sigterm_to_rank_0(launcher: subprocess.Popen) -> None:
    """What a service manager does to the server's process: mlx.launch ends once every rank has."""
    os.kill(rank_pid(launcher.pid, 0), signal.SIGTERM)
    assert launcher.wait(timeout=LAUNCH_TIMEOUT) == 0


@pytest.mark.parametrize("stop", [ctrl_c, sigterm_to_rank_0], ids=lambda f: f.__name__)
def test_a_cancelled_request_under_mlx_launch_leaves_every_rank_serving_and_stopping_rank_0_ends_them(
        moe_dir, tmp_path, stop):
    log = tmp_path / "serve.log"
    with serving_under_launch(moe_dir, log) as (server, launcher):
        stream = server.client().chat.completions.create(model="m", messages=user("Keep going"), max_tokens=3000,
                                                         stream=True, extra_headers=script("on " * 3000))
        first = next(c for c in stream if c.choices[0].delta.content)  # it is decoding
        stream.close()
        while f"{first.id}: cancelled" not in log.read_text():  # rank 0 saw the client go and told rank 1
            time.sleep(0.1)
        assert answer(server, *REQUESTS[0])[1] in ("stop", "length")
        stop(launcher)
    assert "Node with rank" not in log.read_text()  # every rank exited 0


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_a_rank_of_serve_that_dies_mid_answer_ends_every_rank_and_the_answer(moe_dir, tmp_path, failing_rank):
    """A rank killed outright (no word to the others) while an answer streams: the stream ends unfinished (an error
    event, cut when rank 0 stops, or the connection lost with it) and every rank ends, with one line, not a hang."""
    log = tmp_path / "serve.log"
    with serving_under_launch(moe_dir, log) as (server, launcher):
        body = {"model": "m", "messages": user("Keep going"), "max_tokens": 3000, "stream": True}
        request = urllib.request.Request(f"{server.url}/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"Authorization": f"Bearer {API_KEY}", **script("on " * 3000)})
        with urllib.request.urlopen(request, timeout=LAUNCH_TIMEOUT) as stream:
            for line in stream:
                if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    break  # it is decoding
            os.kill(rank_pid(launcher.pid, failing_rank), signal.SIGKILL)
            try:
                rest = stream.read()
            except (HTTPException, OSError):  # the connection lost with rank 0
                rest = None
        assert rest is None or not finishes_an_answer(rest)
        launcher.wait(timeout=LAUNCH_TIMEOUT)
    said = log.read_text()
    assert re.search(f"Node with rank {failing_rank} exited with code (-9|137)", said), said
    if failing_rank == 1:  # rank 0 ends naming itself: its peer lost, or the step under way never finishing
        assert "error: rank 0: " in said, said


def test_an_idle_server_under_mlx_launch_leaves_the_other_rank_asleep(moe_dir, tmp_path):
    """While no request comes, rank 0 meets the others once a tick and they sleep in between (not poll)."""
    with serving_under_launch(moe_dir, tmp_path / "serve.log") as (server, launcher):
        assert answer(server, *REQUESTS[0])[1] in ("stop", "length")  # it served; now it is idle
        follower = rank_pid(launcher.pid, 1)
        before, idle = cpu_seconds(follower), 3.0
        time.sleep(idle)
        used = cpu_seconds(follower) - before
        ctrl_c(launcher)
    assert used < 0.25 * idle


def finishes_an_answer(stream: bytes) -> bool:
    """Whether a chat completion's event stream holds the chunk that ends an answer (one with a finish_reason)."""
    chunks = [json.loads(line[6:]) for line in stream.splitlines() if line.startswith(b"data: {")]
    return any(chunk.get("choices") and chunk["choices"][0].get("finish_reason") for chunk in chunks)


def rank_pid(launcher: int, rank: int) -> int:
    """The process of one rank: mlx.launch's child (a shell that execs the command) whose MLX_RANK is `rank`."""
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            if parent == launcher and f"MLX_RANK={rank}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                return int(proc.name)
    raise AssertionError(f"no rank {rank} under mlx.launch {launcher}")


def test_a_prompt_cache_on_disk_under_mlx_launch_is_refused_in_one_line(moe_dir, tmp_path):
    result = launch(2, sys.executable, "-m", "qwenmlx", "serve", "-m", str(moe_dir), "--no-memory-check",
                    "--prompt-cache-dir", str(tmp_path / "cache"))
    assert "error: --prompt-cache-dir" in result.stderr and "not under mlx.launch" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "cache").exists()
