"""An offline demo prompt pack: math, code and chat prompts generated with no downloaded data.

* math: multi-step word problems from procedural templates (names, items, numbers, phrasings),
  in a grade-school style but not taken from any benchmark.
* code: function-completion prompts shaped (shaping.py) from documented functions in this
  Python's own standard library source, plus short "Write a function ..." tasks from templates.
* chat: writing, explanation, advice and roleplay instructions from templates with many fillers.

``build_demo_pack(out_dir, n_math, n_code, n_chat, seed)`` writes the generated pools under
``out_dir/sources/`` and runs the regular mix build on them, so the pack has the same
prompts.jsonl + manifest.json (and decontamination when ``bench_texts`` is given).
Deterministic per seed (and per Python version, for the standard-library part).
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

from dflash_lab.data.records import prompt_id, write_jsonl
from dflash_lab.errors import DFlashLabError

NAMES = (
    "Amara Ben Chloe Dmitri Elena Farid Grace Hiro Ines Jamal Keiko Liam Maya Nikhil Olga Pablo Quinn Rosa "
    "Samir Tara Umar Vera Wes Ximena Yusuf Zoe Aiden Bianca Carlos Daria Emeka Fiona Gus Hana Ivan Jade Kofi "
    "Lena Marco Nadia Omar Priya Rafael Sofia Theo Uma Victor Wendy Yara Zane"
).split()
SHOPS = ("bakery", "bookstore", "farm stand", "hardware store", "toy shop", "florist", "cafe", "market stall")
ITEMS = (
    ("muffin", "muffins"), ("notebook", "notebooks"), ("apple", "apples"), ("pencil", "pencils"),
    ("sticker", "stickers"), ("cupcake", "cupcakes"), ("marble", "marbles"), ("tulip", "tulips"),
    ("comic book", "comic books"), ("jar of honey", "jars of honey"), ("candle", "candles"),
    ("seed packet", "seed packets"), ("puzzle", "puzzles"), ("lemon", "lemons"), ("bracelet", "bracelets"),
)
ASK = ("How many {x} does {n} have now?", "How many {x} are left?", "What is the number of {x} remaining?",
       "How many {x} remain at the end?")


def _money(rng, lo, hi, cents=True):
    v = rng.randint(lo * 4, hi * 4) / 4 if cents else rng.randint(lo, hi)
    return f"${v:.2f}" if cents and v != int(v) else f"${int(v)}", v


def _m_shop(rng):
    n, shop = rng.choice(NAMES), rng.choice(SHOPS)
    (s1, p1), (s2, p2) = rng.sample(ITEMS, 2)
    a, b = rng.randint(2, 12), rng.randint(2, 9)
    pa, _ = _money(rng, 1, 9)
    pb, _ = _money(rng, 2, 15)
    paid = rng.choice((20, 50, 100))
    lead = rng.choice((f"{n} goes to the {shop}", f"At the {shop}, {n} shops for a party", f"{n} stops by a {shop}"))
    q = rng.choice((f"How much change does {n} get from ${paid}?", f"If {n} pays with a ${paid} bill, how much change is returned?",
                    f"{n} hands over ${paid}. What is the change?"))
    return f"{lead} and buys {a} {p1} at {pa} each and {b} {p2} at {pb} each. {q}"


def _m_savings(rng):
    n = rng.choice(NAMES)
    goal, start, per = rng.randint(120, 900), rng.randint(10, 80), rng.randint(8, 45)
    unit = rng.choice(("week", "month", "day"))
    thing = rng.choice(("a bike", "a telescope", "a guitar", "a tablet", "concert tickets", "a camping tent"))
    extra = rng.choice(("", f" Each {unit} {n} also spends ${rng.randint(1, 5)} on snacks."))
    return (f"{n} wants to buy {thing} that costs ${goal}. {n} already has ${start} saved and puts away ${per} "
            f"every {unit}.{extra} How many {unit}s will it take until {n} can afford {thing}?")


def _m_rate(rng):
    n = rng.choice(NAMES)
    v1, t1, v2, t2 = rng.randint(30, 75), rng.randint(2, 5), rng.randint(10, 60), rng.randint(1, 4)
    veh = rng.choice(("drives", "cycles", "rides a train", "sails"))
    q = rng.choice(("How far does {n} travel in total?", "What total distance does {n} cover?",
                    "What is {n}'s average speed over the whole trip?"))
    return (f"{n} {veh} at {v1} miles per hour for {t1} hours, then at {v2} miles per hour for {t2} hours. "
            + q.format(n=n))


def _m_percent(rng):
    n, shop = rng.choice(NAMES), rng.choice(SHOPS)
    price, off, tax = rng.randint(20, 400), rng.choice((10, 15, 20, 25, 30, 40)), rng.choice((5, 6, 8, 10))
    thing = rng.choice(("jacket", "lamp", "pair of boots", "backpack", "board game", "coffee maker"))
    return (f"A {thing} at the {shop} is priced at ${price}. This week it is {off}% off, and a {tax}% sales tax is "
            f"added to the discounted price. How much does {n} pay for the {thing}?")


def _m_share(rng):
    a, b, c = rng.sample(NAMES, 3)
    s, p = rng.choice(ITEMS)
    total = rng.randint(4, 20) * 6
    f1, f2 = rng.choice(((1, 2), (1, 3), (1, 4), (2, 3))), rng.choice((3, 4, 5, 6))
    return (f"{a} has {total} {p}. {a} gives {f1[0]}/{f1[1]} of them to {b}, then gives {f2} to {c}. "
            + rng.choice(ASK).format(x=p, n=a))


def _m_ages(rng):
    a, b = rng.sample(NAMES, 2)
    k, d, y = rng.randint(2, 4), rng.randint(3, 20), rng.randint(2, 10)
    return rng.choice((
        f"{a} is {k} times as old as {b}. In {y} years, the sum of their ages will be {k * d + d + 2 * y}. How old is {b} now?",
        f"{b} is {d} years old. {a} is {k} times {b}'s age. How old will {a} be in {y} years?",
        f"In {y} years {a} will be twice as old as {b} is now. If {b} is {d + y} years old, how old is {a} today?",
    ))


def _m_work(rng):
    a, b = rng.sample(NAMES, 2)
    ta, tb = rng.choice(((3, 6), (4, 12), (6, 3), (5, 20), (10, 15), (2, 3)))
    task = rng.choice(("paint a fence", "mow a lawn", "sort a box of letters", "assemble a shelf", "wash the cars"))
    return (f"{a} can {task} in {ta} hours, and {b} can do the same job in {tb} hours. "
            f"Working together, how long will it take them to {task}?")


def _m_garden(rng):
    n = rng.choice(NAMES)
    rows, per, dead = rng.randint(3, 15), rng.randint(4, 20), rng.randint(2, 9)
    plant = rng.choice(("tomato plants", "sunflowers", "lettuce heads", "pepper plants", "rose bushes"))
    sell = rng.randint(2, 6)
    return (f"{n} plants {rows} rows of {plant} with {per} in each row. {dead} of them do not survive. "
            f"{n} sells each remaining plant for ${sell}. How much money does {n} make?")


def _m_recipe(rng):
    n = rng.choice(NAMES)
    serves, want = rng.choice((2, 4, 6, 8)), rng.choice((3, 5, 10, 12, 16, 18))
    cups = rng.choice((1.5, 2, 2.5, 3, 0.75))
    ing = rng.choice(("flour", "sugar", "rice", "milk", "oats"))
    return (f"A recipe that serves {serves} people uses {cups} cups of {ing}. {n} is cooking for {want} people. "
            f"How many cups of {ing} does {n} need?")


def _m_area(rng):
    n = rng.choice(NAMES)
    L, W, cost = rng.randint(8, 40), rng.randint(5, 30), rng.choice((2, 3, 4.5, 6, 12))
    what = rng.choice(("carpet", "tiles", "sod", "paint"))
    return (f"{n}'s room is a rectangle {L} feet long and {W} feet wide. {what.capitalize()} costs ${cost} per "
            f"square foot. How much will it cost to cover the whole floor, and what is the room's perimeter?")


def _m_schedule(rng):
    n = rng.choice(NAMES)
    h, m = rng.randint(6, 10), rng.choice((0, 15, 30, 45))
    d1, d2, d3 = rng.randint(20, 90), rng.randint(10, 60), rng.randint(15, 120)
    return (f"{n} starts work at {h}:{m:02d} a.m. {n} spends {d1} minutes answering email, {d2} minutes in a "
            f"meeting and {d3} minutes writing a report. At what time does {n} finish these tasks?")


def _m_classroom(rng):
    t = rng.choice(NAMES)
    students, pct, groups = rng.choice((24, 30, 32, 36, 40)), rng.choice((25, 50, 75, 20, 40)), rng.choice((2, 3, 4))
    return (f"Ms. {t}'s class has {students} students. {pct}% of them signed up for the science fair, and those "
            f"students are split evenly into {groups} teams. How many students are on each team?")


def _m_tank(rng):
    cap, fill, leak = rng.randint(200, 1200), rng.randint(10, 40), rng.randint(1, 9)
    return rng.choice((
        f"A water tank holds {cap} liters. A pump fills it at {fill} liters per minute while a leak drains {leak} "
        f"liters per minute. Starting empty, how many minutes does it take to fill the tank?",
        f"A pool holds {cap} gallons and is filled at {fill} gallons per minute, but {leak} gallons per minute leak "
        f"out. How long until the pool is full, starting from empty?",
    ))


def _m_pattern(rng):
    n = rng.choice(NAMES)
    first, step, days = rng.randint(1, 10), rng.randint(2, 7), rng.randint(5, 14)
    act = rng.choice(("push-ups", "pages", "laps", "words in a new language", "minutes of piano practice"))
    return (f"{n} does {first} {act} on the first day and {step} more each day than the day before. "
            f"How many {act} does {n} do in total over {days} days?")


def _m_mix(rng):
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    pa, pb = rng.randint(3, 12), rng.randint(5, 20)
    good = rng.choice((("coffee", "pounds"), ("nuts", "kilograms"), ("tea", "ounces")))
    return (f"A shop mixes {a} {good[1]} of {good[0]} costing ${pa} per {good[1][:-1]} with {b} {good[1]} "
            f"costing ${pb} per {good[1][:-1]}. What is the cost per {good[1][:-1]} of the mixture, to the nearest cent?")


MATH_TEMPLATES = (_m_shop, _m_savings, _m_rate, _m_percent, _m_share, _m_ages, _m_work, _m_garden, _m_recipe,
                  _m_area, _m_schedule, _m_classroom, _m_tank, _m_pattern, _m_mix)
MATH_SUFFIX = ("", "", " Show your reasoning step by step.", " Explain each step.", " Give the final answer at the end.")


def gen_math(rng: random.Random) -> str:
    return rng.choice(MATH_TEMPLATES)(rng) + rng.choice(MATH_SUFFIX)


# ------------------------------------------------------------------------------------------ code

CODE_TASKS = (
    "return the {k} largest numbers in a list, in descending order",
    "check whether a string is a palindrome, ignoring {ign}",
    "count how many times each word occurs in a text and return a dictionary",
    "merge two sorted lists of {typ} into one sorted list without using sort()",
    "remove duplicates from a list of {typ} while keeping the original order",
    "return the sum of the digits of a non-negative integer",
    "find the longest common prefix of a list of strings",
    "convert a Roman numeral to an integer",
    "rotate a list to the {dir} by k positions",
    "return the n-th Fibonacci number using {how}",
    "flatten a nested list of arbitrary depth",
    "check whether two strings are anagrams of each other",
    "return the second smallest distinct value in a list of {typ}",
    "compute the greatest common divisor of two positive integers",
    "split a list into chunks of size {k}",
    "find all pairs of numbers in a list whose sum equals a target",
    "return the indices of the {k} smallest elements of a list",
    "convert a string from snake_case to {case}",
    "validate that a string is a well-formed {thing}",
    "compute the running average of a list of numbers",
    "transpose a matrix given as a list of lists",
    "return the most frequent character in a string, breaking ties by {tie}",
    "count the vowels in a string",
    "return True if a year is a leap year",
    "find the missing number in a list containing 1..n with one value missing",
    "group a list of {thing2} by their first letter",
    "compress a string using run-length encoding",
    "return the prime factors of an integer in ascending order",
    "compute the dot product of two vectors of equal length",
    "check whether brackets in an expression are balanced",
    "return the {k} most common elements of a list with their counts",
    "find the maximum sum of a contiguous sublist",
    "shift every letter of a string by {k} places in the alphabet",
    "parse a date string in the form YYYY-MM-DD and return the day of the week",
    "return all permutations of a short string without duplicates",
    "sum the numbers in a list that are divisible by {k}",
)
FILL = {
    "k": ("2", "3", "4", "5", "k"), "ign": ("case and spaces", "punctuation", "case"),
    "typ": ("integers", "strings", "floats", "tuples"), "dir": ("left", "right"),
    "how": ("iteration", "memoization", "a generator"), "case": ("camelCase", "PascalCase", "kebab-case"),
    "thing": ("IPv4 address", "email address", "hexadecimal color code", "ISO 8601 date"),
    "tie": ("alphabetical order", "first occurrence"), "thing2": ("words", "city names", "file names"),
}
CODE_LEADS = ("Write a function to {t}.", "Write a Python function to {t}.", "Write a python function that will {t}.",
              "Implement a function that can {t}.", "Create a Python function to {t}.")
CODE_TAILS = ("", "", " Include a docstring.", " Add type hints.", " Do not use any imports.",
              " Explain the time complexity briefly.", " Include two example calls.")


def gen_code_task(rng: random.Random) -> str:
    t = rng.choice(CODE_TASKS)
    t = t.format(**{k: rng.choice(v) for k, v in FILL.items()})
    return rng.choice(CODE_LEADS).format(t=t) + rng.choice(CODE_TAILS)


# Modules with many small documented top-level functions; parsing only these keeps it fast.
STDLIB_MODULES = (
    "textwrap.py", "json/__init__.py", "json/decoder.py", "string.py", "shlex.py", "fnmatch.py", "glob.py",
    "posixpath.py", "ntpath.py", "genericpath.py", "statistics.py", "heapq.py", "bisect.py", "calendar.py",
    "colorsys.py", "difflib.py", "base64.py", "html/__init__.py", "quopri.py", "keyword.py", "operator.py",
    "copy.py", "random.py", "secrets.py", "uuid.py", "ipaddress.py", "urllib/parse.py", "email/utils.py",
    "email/quoprimime.py", "http/cookiejar.py", "shutil.py", "tempfile.py", "os.py", "platform.py", "gzip.py",
    "zipfile/__init__.py", "tarfile.py", "csv.py", "inspect.py", "functools.py", "textwrap.py", "mimetypes.py",
    "locale.py", "gettext.py", "codecs.py", "fractions.py", "pprint.py", "reprlib.py", "dis.py", "tokenize.py",
    "ast.py", "typing.py", "dataclasses.py", "enum.py", "re/_parser.py", "sysconfig.py", "warnings.py",
    "linecache.py", "traceback.py", "subprocess.py", "datetime.py", "_pydecimal.py", "wave.py", "filecmp.py",
)


def stdlib_prompts(stdlib_dir: str | Path | None = None) -> list[str]:
    """Function-completion prompts from the standard library source of the running Python."""
    from dflash_lab.data.shaping import shape_python_functions

    base = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    files = sorted({base / m for m in STDLIB_MODULES if (base / m).is_file()})
    return shape_python_functions(files, max_doc_chars=1200)


# ------------------------------------------------------------------------------------------ chat

TOPICS = (
    "photosynthesis", "compound interest", "how vaccines train the immune system", "the water cycle",
    "how a bill becomes law", "black holes", "how GPS works", "supply and demand", "the French Revolution",
    "machine learning", "how bread rises", "plate tectonics", "the stock market", "how noise-cancelling headphones work",
    "inflation", "the history of the printing press", "why the sky is blue", "how bees communicate",
    "the difference between weather and climate", "blockchains", "how the heart pumps blood", "recycling plastics",
    "the Silk Road", "how airplanes stay in the air", "sleep cycles", "renewable energy", "the Roman aqueducts",
)
AUDIENCES = ("a ten-year-old", "a high school student", "a busy executive", "my grandmother", "a complete beginner",
             "someone who knows some physics", "a curious teenager")
WRITING = (
    "Write a short story about {who} who discovers {thing} in {place}.",
    "Write a poem about {mood} mornings in {place}, in {form}.",
    "Draft a polite email to {rec} asking to {ask}.",
    "Write a product description for {product}, aimed at {aud}.",
    "Compose a toast for {event}, keeping it under 150 words.",
    "Write a blog post introduction about {topic} that hooks the reader in the first sentence.",
    "Write a cover letter opening for a job as {job}.",
    "Write a dialogue between {who} and {who2} about {topic}.",
)
EXPLAIN = (
    "Explain {topic} to {aud}.",
    "Can you explain {topic} in three short paragraphs?",
    "What are the most common misconceptions about {topic}?",
    "Summarize the key ideas behind {topic} as a bulleted list.",
    "Compare {topic} with {topic2}: what do they have in common?",
)
ADVICE = (
    "I have {time} to prepare for {event2}. How should I plan my time?",
    "How can I {goal} when I {constraint}?",
    "What should I consider before {decision}?",
    "Give me a {days}-day plan to {goal}.",
    "My friend keeps {annoy}. How can I bring it up without hurting them?",
)
ROLEPLAY = (
    "Pretend you are {role}. Greet a visitor and describe {place}.",
    "Act as {role} and answer my questions about {topic}. First question: where should I start?",
    "You are {role}. Convince me to {goal} in a short speech.",
    "Role-play as {role} interviewing me for a job as {job}. Ask the first question.",
)
F = {
    "who": ("a retired lighthouse keeper", "a young inventor", "a lost robot", "a baker", "two rival chess players",
            "a librarian", "a street musician", "an astronaut on her last mission"),
    "who2": ("a talking cat", "her future self", "a skeptical journalist", "an old friend"),
    "thing": ("a hidden door", "an old map", "a letter from 1920", "a seed that glows", "a broken compass"),
    "place": ("a small coastal town", "Tokyo", "the Sahara", "a floating city", "a mountain village", "Lisbon",
              "an abandoned train station", "the rainforest"),
    "mood": ("quiet", "rainy", "hopeful", "frosty"), "form": ("free verse", "rhyming couplets", "a haiku sequence"),
    "rec": ("my landlord", "a professor", "my manager", "a customer", "the city council"),
    "ask": ("reschedule a meeting", "extend a deadline by a week", "fix a broken heater", "review my proposal"),
    "product": ("a solar-powered lantern", "a reusable water bottle", "noise-cancelling earbuds", "a standing desk"),
    "aud": AUDIENCES, "topic": TOPICS, "topic2": TOPICS,
    "event": ("my sister's wedding", "a retirement party", "a team's championship win", "a 50th birthday"),
    "event2": ("a job interview", "a marathon", "a driving test", "a presentation to investors", "final exams"),
    "job": ("a data analyst", "a nurse", "a park ranger", "a software engineer", "a chef", "a teacher"),
    "time": ("two weeks", "three days", "one month", "ten days"),
    "goal": ("learn to cook healthy meals", "save more money", "start running", "read more books",
             "learn a new language", "sleep better", "get organized at work"),
    "constraint": ("work night shifts", "have two small kids", "live in a tiny apartment", "have a tight budget"),
    "decision": ("adopting a dog", "changing careers", "moving abroad", "buying a used car", "going back to school"),
    "days": ("7", "14", "30"),
    "annoy": ("arriving late", "borrowing things without asking", "interrupting me", "canceling plans last minute"),
    "role": ("a tour guide in ancient Rome", "a pirate captain", "a museum curator", "a wise old wizard",
             "a detective in 1940s Los Angeles", "a barista who loves science", "a travel agent from the future"),
}
CHAT_FAMILIES = (WRITING, EXPLAIN, ADVICE, ROLEPLAY)


def gen_chat(rng: random.Random) -> str:
    tpl = rng.choice(rng.choice(CHAT_FAMILIES))
    return tpl.format(**{k: rng.choice(v) for k, v in F.items()})


# ------------------------------------------------------------------------------------------ pack


def _unique(gen, rng, n: int, tries_factor: int = 50) -> list[str]:
    out, seen = [], set()
    for _ in range(max(n * tries_factor, 100)):
        if len(out) >= n:
            break
        t = gen(rng)
        pid = prompt_id(t)
        if pid not in seen:
            seen.add(pid)
            out.append(t)
    return out


def build_demo_pack(
    out_dir: str | Path,
    n_math: int = 1000,
    n_code: int = 1000,
    n_chat: int = 1000,
    seed: int = 0,
    bench_texts: dict[str, list[str]] | None = None,
) -> Path:
    """Write a demo prompt pack (prompts.jsonl, manifest.json, ids.txt, sources/) and return its folder."""
    from dflash_lab.data.mix import build_mix

    for k, v in (("n_math", n_math), ("n_code", n_code), ("n_chat", n_chat)):
        if v < 0:
            raise DFlashLabError(f"build_demo_pack: {k} must be >= 0, got {v}")
    out_dir = Path(out_dir)
    src_dir = out_dir / "sources"
    margin = lambda n: n + n // 5 + 20  # room for decontamination removals
    math = _unique(gen_math, random.Random(f"{seed}:math"), margin(n_math))
    chat = _unique(gen_chat, random.Random(f"{seed}:chat"), margin(n_chat))
    stubs = stdlib_prompts()
    random.Random(f"{seed}:stdlib").shuffle(stubs)
    stubs = stubs[: n_code // 2]
    tasks = _unique(gen_code_task, random.Random(f"{seed}:code"), margin(n_code - len(stubs)))
    files = {"math": math, "code-stdlib": stubs, "code-tasks": tasks, "chat": chat}
    for name, texts in files.items():
        write_jsonl(src_dir / f"{name}.jsonl", ({"prompt": t} for t in texts))
    recipe = {
        "name": f"demo-pack-seed{seed}",
        "description": "offline demo pack: generated math word problems, stdlib function completion + code tasks, chat",
        "seed": seed,
        "sources": [
            {"name": "demo-math", "path": "sources/math.jsonl", "prompt_field": "prompt", "category": "math"},
            {"name": "demo-code-stdlib", "path": "sources/code-stdlib.jsonl", "prompt_field": "prompt", "category": "code"},
            {"name": "demo-code-tasks", "path": "sources/code-tasks.jsonl", "prompt_field": "prompt", "category": "code"},
            {"name": "demo-chat", "path": "sources/chat.jsonl", "prompt_field": "prompt", "category": "chat"},
        ],
        "quotas": {"categories": {"math": n_math, "code": n_code, "chat": n_chat}},
        "allow_shortfall": True,
    }
    build_mix(recipe, out_dir, base_dir=out_dir, bench_texts=bench_texts, kind="demo")
    return out_dir
