"""
data/envs.py: offline, procedurally generated environments for post-training: SFT demonstrations and RL
with verifiable rewards. Read data/chat.py (the chat format and the <think> switch) and data/ruler.py first.

Nemotron 3 trains with RL over many environments at once, each a prompt generator with a programmatic
verifier (multi-environment RLVR); Llama-Nemotron teaches one model to answer with or without a visible
reasoning trace (the "detailed thinking on/off" toggle). Here each environment is a seeded generator:
make(env, seed) builds a Task whose answer is known by construction, demonstration() turns it into
assistant turns with thinking on or off (SFT), and verify() scores any completion in [0, 1] (RL).

Environments (ENVS), each drawn from random.Random(seed) alone:
  math      column addition of 2-4 numbers (the trace writes out each column and its carry), or a
            short word problem; reward 1 for the exact integer (whitespace, a trailing period and
            thousands commas allowed)
  code      what a generated 3-8 line Python snippet prints; the answer and a line-by-line trace of
            its variables come from running it in the sandbox (run_python); reward 1 for the exact
            output (trailing spaces ignored)
  instruct  a short reply under 1-3 checkable format constraints (word count, case, a required word;
            or a JSON object with given integer keys and sum); reward: the fraction satisfied
  tools     a question that needs lookups in a small key-value store, then arithmetic; reward 1 for
            the exact integer in the final turn (the tool calls themselves earn nothing)
  add       math's column addition sized to the nano model: two numbers from 1 to 999, same
            trace and reward (docs/posttraining.md: the 0.89M model learns this one)
  add5      the same with two numbers of 1 to 5 digits each (the digit counts uniform): a copy
            that one attention layer learns for three digits only, two learn for five
  ruler     RULER's needle in a haystack (data/ruler.py) at 500-2000 bytes; RULER's string-match score
            (the needle's value anywhere in the answer), 0 for an answer over 100 characters

Split: seeds below HELDOUT are for training, seeds from HELDOUT up are held out for evaluation; tasks()
keeps the two apart. Only the text after the last </think> is graded (final_answer).

Tool protocol (tools): the assistant calls a tool with a turn holding "<tool>name: argument</tool>";
the caller answers with a {"role": "tool", "content": result} turn (run_tool); the turn without a
tool call is the final answer. Tools: "lookup: <key>" (the task's store) and "calc: <expression>"
(integer arithmetic parsed with the ast module, never eval).

    python data/envs.py math 3      # print the prompt, demonstration and reward of seeds 0..2
"""
import ast, json, math, os, random, re, resource, selectors, signal, subprocess, sys, time
from dataclasses import dataclass, field
from fractions import Fraction

if __name__ == "__main__":  # run as a script: put the repo root on sys.path for `data.ruler`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data import ruler
from data.chat import THINK_CLOSE, THINK_OPEN
from data.tokenizer import ByteTokenizer

HELDOUT = 1_000_000_000  # seeds >= HELDOUT are the held-out split, never used for training
MAX_TURNS = 5  # assistant turns an episode may take: a tools demonstration takes 4 (two lookups, calc, the
# answer), and one more lets a policy retry a failed call (rl.py's and eval.py's --max_turns)
TASK_BYTES = 440  # a task's prompt, trace and answer at most: with the chat template's turns around them, a
# conversation fits in the 512 tokens that config/sft.py trains on and rollouts run in (byte tokens)


@dataclass
class Task:
    env: str        # environment name
    seed: int       # make(env, seed) gives the same task again
    prompt: str     # the user turn
    answer: str     # the reference final answer
    trace: str      # the step-by-step reasoning a <think> demonstration shows
    meta: dict = field(default_factory=dict)  # what the verifier (and tools) need


def final_answer(completion):
    """The text after the last </think> (all of it if there is none), stripped; '' for a non-string."""
    return completion.rsplit(THINK_CLOSE, 1)[-1].strip() if isinstance(completion, str) else ""


def parse_int(text):
    text = text.strip().removesuffix(".").strip()
    if len(text) > 64 or not re.fullmatch(r"[-+]?(\d{1,3}(,\d{3})+|\d+)", text):
        return None
    return int(text.replace(",", ""))


# ----------------------------------------------------------------------------
# the sandbox

# runs in the child before the code: preload the allowed modules, then refuse every further import,
# and through an audit hook (PEP 578) the events that reach outside the process
PRELUDE = """\
import sys, math, random, json, re, collections, itertools, functools, string, heapq, bisect, operator
def hook(event, args, prefixes=("os.", "socket.", "subprocess.", "shutil.", "ctypes.", "gc.", "resource.",
                                 "signal.", "mmap.", "import")):
    if (event == "open" and isinstance(args[2], int) and args[2] & 0o3103  # O_WRONLY O_RDWR O_CREAT O_TRUNC O_APPEND
            or event.startswith(prefixes) or event == "object.__setattr__" and args[1] == "__code__"):
        raise PermissionError(f"sandbox: {event}{' for writing' if event == 'open' else ''} refused")
sys.addaudithook(hook)
del hook
exec(compile(sys.argv[1], "<snippet>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
"""


def set_limits(timeout, memory_mb):  # in the child, between fork and exec
    cpu = max(1, math.ceil(timeout))
    for what, n in ((resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, (memory_mb << 20,) * 2),
                    (resource.RLIMIT_FSIZE, (0, 0)), (resource.RLIMIT_CORE, (0, 0)), (resource.RLIMIT_NPROC, (1, 1))):
        try:
            resource.setrlimit(what, n)
        except (ValueError, OSError):  # e.g. a hard limit already lower
            pass


def run_python(code, timeout=2.0, memory_mb=256, max_output=4096):
    """Run `code` in a fresh Python process; (True, stdout) if it exits cleanly, else (False, the error's
    last line, e.g. "ZeroDivisionError: division by zero" or "timed out after 2 s"). Never raises.
    stdout past max_output bytes is read and dropped.

    A best-effort sandbox for generated or model-written snippets on Linux, not a security boundary:
    - the process: `python -I -S -B`, an empty environment, cwd /, its own session (the whole process
      group is killed at the wall-clock timeout); rlimits: CPU ~timeout s, address space memory_mb,
      file size 0, no core dumps, 1 process (the kernel ignores this one for root);
    - a prelude preloads math, random, json, re, collections, itertools, functools, string, heapq,
      bisect and operator (and what they import, os among them), then installs an audit hook that
      refuses any further import (so no socket, subprocess or ctypes), open() for writing, every os.*
      event (system, exec*, fork, spawn, kill, remove, rename, mkdir, chmod, ...), socket.*, ctypes.*,
      gc.* and swapping a function's __code__ (the hook's own);
    - it does NOT stop reading files the user can read, burning CPU up to the limits, or escapes
      through interpreter bugs or audit events CPython lacks. Use a container or a VM for hostile code.
    Footgun: the limits are set in a preexec_fn, which the subprocess docs call unsafe in a process
    with threads (a rare deadlock in the child); call it from a single-threaded worker."""
    if not isinstance(code, str) or "\0" in code:
        return False, "error: code must be a string without NUL characters"
    try:
        p = subprocess.Popen([sys.executable, "-I", "-S", "-B", "-c", PRELUDE, code], stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/", env={"LC_ALL": "C.UTF-8"},
                             start_new_session=True, preexec_fn=lambda: set_limits(timeout, memory_mb))
    except (OSError, ValueError, subprocess.SubprocessError) as e:
        return False, f"error: cannot start the sandbox: {e}"
    out, err, deadline = bytearray(), bytearray(), time.monotonic() + timeout
    try:
        with selectors.DefaultSelector() as sel:
            sel.register(p.stdout, selectors.EVENT_READ)
            sel.register(p.stderr, selectors.EVENT_READ)
            while sel.get_map() and time.monotonic() < deadline:
                for key, _ in sel.select(deadline - time.monotonic()):
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        sel.unregister(key.fileobj)
                    elif key.fileobj is p.stdout:
                        out += chunk[:max(0, max_output - len(out))]  # the head of stdout
                    else:
                        err = (err + chunk)[-4096:]  # the tail of stderr
        try:
            p.wait(max(0.01, deadline - time.monotonic()))
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out = True
    except Exception as e:  # never raise: report it as the error
        timed_out, err = False, bytearray(f"error: {e}".encode())
    finally:
        try:
            os.killpg(p.pid, signal.SIGKILL)  # the group: anything it started too
        except OSError:
            pass
        rc = p.wait()
        p.stdout.close()
        p.stderr.close()
    if timed_out:
        return False, f"timed out after {timeout:g} s"
    if rc == 0:
        return True, out.decode("utf-8", "replace")
    lines = [line for line in err.decode("utf-8", "replace").splitlines() if line.strip()]
    if lines:
        return False, lines[-1]
    if rc == -signal.SIGXCPU or rc == -signal.SIGKILL:
        return False, "CPU time limit exceeded"
    return False, f"killed by signal {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"


# ----------------------------------------------------------------------------
# math: column addition and word problems

PLACES = ["units", "tens", "hundreds", "thousands", "ten-thousands", "hundred-thousands", "millions"]
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun"]


def add_columns(numbers):
    """The trace of a column addition: the numbers right-aligned, then one line per column with its carry."""
    total, width = sum(numbers), len(str(max(numbers)))
    lines = [f"  {numbers[0]:>{width}}"] + [f"+ {n:>{width}}" for n in numbers[1:]]
    carry = 0
    for j in range(width):
        digits = [str(n)[::-1][j] for n in numbers if len(str(n)) > j]
        s = sum(map(int, digits)) + carry
        said = " + ".join(digits) + (f" + carry {carry}" if carry else "")
        lines.append(f"{PLACES[j]}: {said} = {s}, write {s % 10}" + (f", carry {s // 10}" if s >= 10 else ""))
        carry = s // 10
    if carry:
        lines.append(f"{PLACES[width]}: carry {carry}, write {carry}")
    return "\n".join(lines + [f"The sum is {total}."])


def column_task(numbers):
    prompt = f"Compute {' + '.join(map(str, numbers))}. Give the final answer as a single integer."
    return prompt, str(sum(numbers)), add_columns(numbers), {"kind": "column"}


def numbers(rng, digits):  # one random number of each digit count in digits
    return [rng.randint(10 ** (d - 1), 10 ** d - 1) for d in digits]


def add_task(rng):  # math sized to the nano model: one kind of problem, short numbers
    return column_task([rng.randint(1, 999), rng.randint(1, 999)])


def add5_task(rng):  # the copy test: numbers of any length up to math's five digits
    return column_task(numbers(rng, [rng.randint(1, 5), rng.randint(1, 5)]))


def math_task(rng):
    if rng.random() < 0.5:
        digits = [rng.randint(2, 5) for _ in range(rng.randint(2, 4))]
        return column_task(numbers(rng, digits))
    name, thing = rng.choice(NAMES), rng.choice(["apples", "marbles", "stickers", "cards", "shells", "coins"])
    n = rng.randint(10, 99)
    story, steps = [f"{name} has {n} {thing}."], []
    for _ in range(rng.randint(2, 3)):
        op = rng.choice(["buys", "gives", "finds"] if n > 0 else ["buys", "finds"])
        if op == "buys":
            k, m, box = rng.randint(2, 6), rng.randint(3, 15), rng.choice(["bags", "boxes", "packs"])
            story.append(f"{name} buys {k} {box} of {m} {thing}.")
            steps.append(f"{k} {box} of {m} is {k} * {m} = {k * m}; {n} + {k * m} = {n + k * m}.")
            n += k * m
        elif op == "gives":
            g = rng.randint(1, n)
            story.append(f"{name} gives away {g} {thing}.")
            steps.append(f"Giving away {g}: {n} - {g} = {n - g}.")
            n -= g
        else:
            f = rng.randint(1, 30)
            story.append(f"{name} finds {f} more {thing}.")
            steps.append(f"Finding {f}: {n} + {f} = {n + f}.")
            n += f
    prompt = " ".join(story) + f" How many {thing} does {name} have now? Give the final answer as a single integer."
    trace = "\n".join([story[0].replace(" has ", " starts with ")] + steps + [f"{name} has {n} {thing}."])
    return prompt, str(n), trace, {"kind": "word"}


def grade_integer(task, final):
    return float(parse_int(final) == int(task.answer))


# ----------------------------------------------------------------------------
# code: predict a snippet's output

# runs the snippet under sys.settrace in the sandbox: its output, and the variables before each line
TRACER = """\
import sys, io, json
buf, rows = io.StringIO(), []
def state(ns):
    return {k: repr(v) for k, v in ns.items() if not k.startswith("__")}
def tracer(frame, event, arg):
    if event == "line" and frame.f_code.co_filename == "<code>" and frame.f_code.co_name == "<module>":
        rows.append([frame.f_lineno, state(frame.f_locals), len(buf.getvalue())])
    return tracer
ns, real = {}, sys.stdout
sys.stdout = buf
sys.settrace(tracer)
exec(compile(SRC, "<code>", "exec"), ns)
sys.settrace(None)
sys.stdout = real
print(json.dumps({"out": buf.getvalue(), "rows": rows + [[0, state(ns), len(buf.getvalue())]]}))
"""


def snippet(rng):
    v = rng.randint
    kind = rng.choice(["for", "while", "string", "list", "branch"])
    if kind == "for":
        body = rng.choice([f"total += i * {v(1, 4)}", "total = total * 2 - i", f"total -= i + {v(1, 3)}"])
        lines = [f"total = {v(0, 9)}", f"for i in range({v(0, 2)}, {v(3, 5)}):", f"    {body}"]
        lines += ["    if i % 2 == 0:", f"        total += {v(1, 5)}"] if rng.random() < 0.5 else []
        return lines + ["print(total)"]
    if kind == "while":
        step = rng.choice(["n = n // 2", f"n = n - {v(3, 9)}"])
        return [f"n = {v(20, 90)}", "steps = 0", f"while n > {v(1, 9)}:", f"    {step}", "    steps += 1",
                "print(steps, n)"]
    if kind == "string":
        s = ruler.word(rng).replace("-", "")
        a = v(0, 3)
        t = rng.choice([f"s[{a}:{a + v(2, 4)}]", "s[::-1]", "s[::2]", f"s[-{v(2, 4)}:]"])
        u = rng.choice(["t.upper()", "t + s[0]", f"t * {v(2, 3)}", "t.replace('a', 'o')"])
        return [f"s = {s!r}", f"t = {t}", f"u = {u}", rng.choice(["print(u)", "print(len(s), u)", "print(u, t[0])"])]
    if kind == "list":
        xs = [v(1, 20) for _ in range(v(3, 5))]
        op = rng.choice(["xs.sort()", "xs.reverse()", f"xs.pop({v(0, 2)})", "xs.insert(1, xs[-1])"])
        m = v(2, 3)
        return [f"xs = {xs}", f"xs.append({v(1, 20)})", op, f"ys = [x * {m} for x in xs if x % 2 == 0]",
                rng.choice(["print(xs[0] + xs[-1], len(ys))", "print(sum(ys), xs[1])", "print(max(xs) - min(xs), ys)"])]
    a, b = v(5, 30), v(2, 6)
    return [f"a = {a}", f"b = {b}", f"if a % b == {v(0, 2)}:", "    a = a * b", "else:", f"    a = a - b * {v(1, 3)}",
            rng.choice(["print(a, a % 5)", "print(a // b, a)"])]


def walk(lines, rows, out):
    """One trace line per executed line: what it changed, what it printed, which way a condition went; the
    statement is written out the first time a line runs (a loop's later passes give only the effect)."""
    said_lines, seen = [], set()
    for (ln, before, pos), (nxt, after, pos2) in zip(rows, rows[1:]):
        stmt = lines[ln - 1].strip()
        said = [f"{k} = {v}" for k, v in after.items() if before.get(k) != v]
        target = re.match(r"(\w+) *[-+*/]?=[^=]", stmt)
        if not said and target and target.group(1) in after:  # assigned the value it already had
            said = [f"{target.group(1)} = {after[target.group(1)]}"]
        if stmt.startswith(("if ", "while ")):
            said.insert(0, "true" if nxt == ln + 1 else "false")
        printed = out[pos:pos2].rstrip("\n")
        if pos2 > pos:
            said.append(f"prints {printed!r}")
        said = said or (["the loop ends"] if stmt.startswith("for ") else ["no change"])
        said_lines.append(f"line {ln}: " + (f"{stmt}  ->  " if ln not in seen else "") + ", ".join(said))
        seen.add(ln)
    return "\n".join(said_lines + ["Output:", out.rstrip("\n")])


def code_task(rng):
    while True:  # a snippet whose trace would not fit the context is drawn again (long loops)
        lines = snippet(rng)
        src = "\n".join(lines) + "\n"
        ok, result = run_python(f"SRC = {src!r}\n" + TRACER, timeout=5.0, max_output=1 << 16)
        if not ok:
            raise RuntimeError(f"a generated snippet failed in the sandbox: {result}\n{src}")
        run = json.loads(result)
        prompt = f"What does this Python code print?\n```python\n{src}```\nReply with the exact output only."
        answer, trace = run["out"].rstrip("\n"), walk(lines, run["rows"], run["out"])
        if len(prompt) + len(trace) + len(answer) <= TASK_BYTES:
            return prompt, answer, trace, {"source": src}


def grade_output(task, final):
    norm = lambda s: "\n".join(line.rstrip() for line in s.strip().splitlines())
    return float(norm(final) == norm(task.answer))


# ----------------------------------------------------------------------------
# instruct: format constraints

TOPICS = {
    "rivers": "rivers carry rain from the hills to the sea and shape the land they cross over many thousands of years",
    "bread": "bread is made from flour water salt and yeast and then left to rise before it bakes in a hot oven",
    "chess": "chess is a game for two players who move pieces on a board of sixty four squares to trap a king",
    "owls": "owls hunt at night on silent wings and their sharp ears find mice moving under leaves and snow",
    "bicycles": "bicycles turn the push of your legs into speed with two wheels a chain and a pair of pedals",
    "libraries": "libraries lend books for free and give everyone a quiet place to read and learn and meet people",
    "bees": "bees visit flowers all day to gather nectar which they carry home and turn into honey for the winter",
    "tides": "tides rise and fall twice a day because the moon and the sun pull on the oceans of the earth",
    "volcanoes": "volcanoes form where hot rock from deep underground breaks through the crust and cools into hills",
    "maps": "maps shrink a whole city or country onto one page so that travellers can find their way around",
}
EXTRA_WORDS = ["morning", "history", "gentle", "window", "silver", "patience", "journey", "garden"]


def instruct_task(rng):
    topic = rng.choice(list(TOPICS))
    if rng.random() < 0.25:  # JSON: two constraints, so partial credit for the right shape with a wrong sum
        keys, total = rng.sample(["a", "b", "x", "y", "left", "right", "red", "blue"], 2), rng.randint(5, 99)
        a = rng.randint(0, total)
        prompt = (f"Split {total} points about {topic} between \"{keys[0]}\" and \"{keys[1]}\". Reply with only a JSON "
                  f"object whose keys are exactly \"{keys[0]}\" and \"{keys[1]}\", with integer values. "
                  f"The two values must sum to {total}.")
        answer = json.dumps({keys[0]: a, keys[1]: total - a})
        trace = f"I need a JSON object with integer keys {keys[0]} and {keys[1]} summing to {total}: {a} + {total - a}."
        return prompt, answer, trace, {"constraints": [["json", keys], ["sum", total]]}
    kinds = rng.sample(["words", "case", "include"], rng.randint(1, 3))
    n, case, extra = rng.randint(5, 15), rng.choice(["lower", "upper"]), rng.choice(EXTRA_WORDS)
    words = TOPICS[topic].split()[:n - 1] if "include" in kinds else TOPICS[topic].split()[:n]
    if "include" in kinds:
        words.insert(rng.randint(1, len(words)), extra)
    answer = " ".join(words) + "."
    if "case" not in kinds:
        answer = answer.capitalize()
    elif case == "upper":
        answer = answer.upper()
    asks = {"words": f"Answer in exactly {n} words.", "include": f"Include the word \"{extra}\".",
            "case": "Use only lowercase letters." if case == "lower" else "Write everything in capital letters."}
    checks = {"words": f"{n} words", "include": f"contains \"{extra}\"", "case": f"all {case}case"}
    constraints = [[k, {"words": n, "case": case, "include": extra}[k]] for k in kinds]
    prompt = f"Write one sentence about {topic}. " + " ".join(asks[k] for k in kinds)
    trace = f"Constraints: {' '.join(asks[k] for k in kinds)}\nDraft: {answer}\n"
    trace += f"Check: {', '.join(checks[k] for k in kinds)}."
    return prompt, answer, trace, {"constraints": constraints}


def json_object(text):
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def satisfied(kind, arg, reply):
    if kind == "words":
        return len(reply.split()) == arg
    if kind == "case":
        return any(c.isalpha() for c in reply) and reply == (reply.lower() if arg == "lower" else reply.upper())
    if kind == "include":
        return re.search(rf"\b{re.escape(arg)}\b", reply, re.IGNORECASE) is not None
    obj = json_object(reply)
    ints = obj is not None and all(type(x) is int for x in obj.values())  # bool is no integer here
    if kind == "json":
        return ints and sorted(obj) == sorted(arg)
    return ints and len(obj) == 2 and sum(obj.values()) == arg  # "sum"


def grade_constraints(task, final):
    constraints = task.meta["constraints"]
    return sum(satisfied(kind, arg, final) for kind, arg in constraints) / len(constraints)


# ----------------------------------------------------------------------------
# tools: lookups then arithmetic

ITEMS = ["pear", "fig", "apple", "lemon", "plum", "melon", "kiwi", "onion", "carrot", "bagel"]
CALC_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
            ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b}
CALC_BITS = 128  # a larger intermediate result is refused: no blowups


def calc(expression):
    """Integer arithmetic: + - * / // % and parentheses over int literals, walked on the ast (never eval).
    / is exact (a fraction, shown as a decimal when it is not whole). The result as text, or "error: ..."."""
    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            r = Fraction(node.value)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            r = -value(node.operand)
        elif isinstance(node, ast.BinOp) and type(node.op) in CALC_OPS:
            r = Fraction(CALC_OPS[type(node.op)](value(node.left), value(node.right)))
        else:
            what = type(getattr(node, "op", node)).__name__
            raise ValueError(f"{what} is not allowed: only integers, + - * / // % and parentheses")
        if max(r.numerator.bit_length(), r.denominator.bit_length()) > CALC_BITS:
            raise ValueError("result too large")
        return r
    if not isinstance(expression, str) or len(expression) > 200:
        return "error: the expression must be text of at most 200 characters"
    try:
        r = value(ast.parse(expression.strip(), mode="eval").body)
    except ZeroDivisionError:
        return "error: division by zero"
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        return f"error: {e.msg if isinstance(e, SyntaxError) else str(e) or type(e).__name__}"
    return str(r.numerator) if r.denominator == 1 else str(round(float(r), 6))


def tools_task(rng):
    if rng.random() < 0.5:  # prices: two items, others in the store
        store = {k: rng.randint(2, 99) for k in rng.sample(ITEMS, 5)}
        items = rng.sample(list(store), 2)
        counts = [rng.randint(1, 6) for _ in items]
        parts = [f"{c} {k}{'s' if c > 1 else ''}" for c, k in zip(counts, items)]
        question = f"What do {parts[0]} and {parts[1]} cost, in cents?"
        expression = " + ".join(f"{c}*{store[k]}" for c, k in zip(counts, items))
        trace = f"Look up {items[0]} and {items[1]}, then add."
    else:  # ages: a difference
        store = {k: rng.randint(5, 90) for k in rng.sample(NAMES, 5)}
        older, younger = sorted(rng.sample(list(store), 2), key=lambda k: (-store[k], k))
        store[older] += store[older] == store[younger]  # strictly older
        items = [older, younger]
        question = f"How many years older is {older} than {younger}?"
        expression = f"{store[older]} - {store[younger]}"
        trace = f"Look up {older} and {younger}, then subtract."
    calls = [["lookup", k, str(store[k])] for k in items] + [["calc", expression, calc(expression)]]
    prompt = ("Tools: <tool>lookup: KEY</tool> (a price in cents, or an age), <tool>calc: EXPRESSION</tool> (integer "
              f"+ - * / // %). One call a reply; at the end, the integer alone.\n\n{question}")
    return prompt, calls[-1][2], trace, {"store": store, "calls": calls}


def tool_call(text):
    """The (name, argument) of the first "<tool>name: argument</tool>" in an assistant turn, or None."""
    m = re.search(r"<tool>\s*(\w+)\s*:(.*?)</tool>", text, re.DOTALL) if isinstance(text, str) else None
    return (m.group(1), m.group(2).strip()) if m else None


def run_tool(task, name, argument):
    """A tool's result as text; "error: ..." for an unknown tool, a missing key or a bad expression."""
    try:
        if name == "calc":
            return calc(argument)
        if name == "lookup":
            key = str(argument).strip().lower()
            found = [v for k, v in task.meta.get("store", {}).items() if k.lower() == key]
            return str(found[0]) if found else "error: no such key"
        return f"error: unknown tool {name!r}; the tools are lookup and calc"
    except Exception as e:  # a tool never raises at the model
        return f"error: {type(e).__name__}"


# ----------------------------------------------------------------------------
# ruler: needle in a haystack

RULER_TASKS = ["niah_single_1", "niah_multikey_2", "niah_multikey_3"]  # those that need no essay file
RULER_LENGTH = (500, 2000)  # haystack prompt length in bytes (the byte tokenizer's tokens)
RULER_MAX_ANSWER = 100  # characters: a longer answer scores 0 (listing every value in the haystack earns nothing)


def ruler_task(rng):
    name, length = rng.choice(RULER_TASKS), rng.randint(*RULER_LENGTH)
    text, outputs = ruler.niah(name, length, ByteTokenizer(), rng, rng.random(), essay=None)
    prompt = text[:text.rindex("?") + 1] + " Answer with the value alone."  # RULER's answer prefix dropped
    needle = re.search(r"One of the special magic \w+ for (\S+) is: " + re.escape(outputs[0]) + r"\.", text)
    trace = f"The needle for {needle.group(1)} says: {needle.group(0)}"
    return prompt, outputs[0], trace, {"outputs": outputs, "task": name, "length": length}


def grade_ruler(task, final):
    return ruler.score([final], [task.meta["outputs"]]) / 100 if len(final) <= RULER_MAX_ANSWER else 0.0


# ----------------------------------------------------------------------------
# the environments

# name: (generator(rng), grader(task, final answer))
ENVIRONMENTS = {"math": (math_task, grade_integer), "code": (code_task, grade_output),
                "instruct": (instruct_task, grade_constraints), "tools": (tools_task, grade_integer),
                "ruler": (ruler_task, grade_ruler), "add": (add_task, grade_integer),
                "add5": (add5_task, grade_integer)}
ENVS = tuple(ENVIRONMENTS)


def env_names(text):
    """The environments of a comma-separated list ("math,code"); ValueError naming the valid ones for an
    unknown name or an empty list (rl.py's and eval.py's --envs)."""
    names = [e.strip() for e in text.split(",") if e.strip()]
    unknown = [e for e in names if e not in ENVIRONMENTS]
    if unknown or not names:
        raise ValueError(f"--envs={text!r}: unknown environment {unknown[0] if unknown else '(none given)'!r}; "
                         f"the environments are {', '.join(ENVS)}")
    return names


def make(env, seed):
    """The task of environment `env` with this seed (an int >= 0): the same task for the same seed."""
    if env not in ENVIRONMENTS:
        raise ValueError(f"unknown environment {env!r}; choose from {', '.join(ENVS)}")
    if type(seed) is not int or seed < 0:  # random.Random(-s) is random.Random(s)
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    prompt, answer, trace, meta = ENVIRONMENTS[env][0](random.Random(seed))
    return Task(env, seed, prompt, answer, trace, meta)


def tasks(env, n, split="train", start=0):
    """n tasks with consecutive seeds: start.. for "train", HELDOUT + start.. for "heldout"."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    if start < 0 or split == "train" and start + n > HELDOUT:
        raise ValueError(f"start must be >= 0 and train seeds below HELDOUT = {HELDOUT}")
    base = 0 if split == "train" else HELDOUT
    return [make(env, base + start + i) for i in range(n)]


def verify(task, completion, on_error=None):
    """The reward in [0, 1] of a completion (the assistant's text; only final_answer() is graded).
    Never raises: a malformed completion or task scores 0.0, and on_error(exception), if given,
    hears of a grader that raised (rollout.py records it with the environment's name)."""
    try:
        reward = float(ENVIRONMENTS[task.env][1](task, final_answer(completion)))
        return min(1.0, max(0.0, reward)) if reward == reward else 0.0  # NaN: 0
    except Exception as e:  # a verifier error is no reward, never a crashed RL step
        if on_error is not None:
            on_error(e)
        return 0.0


def demonstration(task, think=True):
    """The reference assistant side as chat messages, thinking on (the trace in <think>) or off (an empty
    <think></think>). tools: an assistant turn per tool call, each followed by the tool's turn, then
    the final answer; the trace goes in the first assistant turn only."""
    opening = f"{THINK_OPEN}\n{task.trace}\n{THINK_CLOSE}\n" if think else f"{THINK_OPEN}{THINK_CLOSE}\n"
    if task.env != "tools":
        return [{"role": "assistant", "content": opening + task.answer}]
    turns = []
    for i, (name, argument, result) in enumerate(task.meta["calls"]):
        turns += [{"role": "assistant", "content": (opening if i == 0 else "") + f"<tool>{name}: {argument}</tool>"},
                  {"role": "tool", "content": result}]
    return turns + [{"role": "assistant", "content": task.answer}]


if __name__ == "__main__":
    env, n = sys.argv[1] if len(sys.argv) > 1 else "math", int(sys.argv[2]) if len(sys.argv) > 2 else 1
    for t in tasks(env, n):
        turns = demonstration(t)
        print(f"== {env} seed {t.seed}\n[user]\n{t.prompt}")
        for m in turns:
            print(f"[{m['role']}]\n{m['content']}")
        print(f"-- reward {verify(t, turns[-1]['content'])}\n")
