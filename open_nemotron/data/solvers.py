"""Teacher (a): built-in step-by-step solvers that write worked reasoning for arithmetic/logic tasks.

Each solver reads the problem from the question text, works it out with exact integer/fraction arithmetic, and writes
short sentences with the intermediate results a careful person would note (order of operations, running totals,
Euclid's steps, repeated division), plus a check where one is natural. Wording varies deterministically with the
item (a `random.Random` seeded from task, difficulty, seed and question), so the SFT data is not one string pattern.

`solve` verifies its own final answer against the gold answer with the task's scorer and returns None rather than a
wrong trace: when reasoning-gym's gold disagrees with exact arithmetic (its `basic_arithmetic` evaluates ``/`` as
floor division), when the question cannot be parsed, or when the task has no solver.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

from open_nemotron.data.tasks import HELDOUT_TASKS, TaskItem, score_answer

# The fixed held-out suite is defined as the tasks the built-in teacher covers (see tasks.HELDOUT_TASKS).
SOLVABLE_TASKS: tuple[str, ...] = HELDOUT_TASKS


@dataclass
class Solution:
    """A worked solution: `reasoning` goes inside ``<think>``; `answer_text` states the final answer in ``\\boxed{}``."""

    reasoning: str
    answer_text: str


class _Unsolvable(Exception):
    """The question is not in a form this solver understands (or exact arithmetic disagrees with the gold answer)."""


def _fmt(x: Fraction | int) -> str:
    x = Fraction(x)
    return str(x.numerator) if x.denominator == 1 else f"{x.numerator}/{x.denominator}"


def _paren_neg(x: Fraction | int) -> str:
    """A number as the right operand of an operator: negatives in parentheses, as a careful writer would."""
    return f"({_fmt(x)})" if x < 0 else _fmt(x)


def _raw_question(item: TaskItem) -> str:
    question = item.entry.get("question") if isinstance(item.entry, dict) else None
    return question if isinstance(question, str) else item.question


def _join(lines: list[str]) -> str:
    return "\n".join(line for line in lines if line)


def _sum_text(numbers: list[int]) -> str:
    """``a + b + c = s``, or just ``a`` for a single number."""
    if len(numbers) == 1:
        return str(numbers[0])
    return f"{' + '.join(map(str, numbers))} = {sum(numbers)}"


# ---------------------------------------------------------------------------------------------------------------
# Addition/multiplication details shared by several solvers


def _split_leading(b: int) -> tuple[int, int]:
    """``b`` as its leading place value plus the rest: 345 -> (300, 45)."""
    high = b - b % 10 ** (len(str(b)) - 1)
    return high, b - high


def _add_detail(a: int, b: int, rng: random.Random) -> str:
    """``a + b = s``, sometimes split by place value when both have several digits (as done in one's head)."""
    high, low = _split_leading(b)
    if a >= 10 and b >= 10 and low and rng.random() < 0.5:
        return f"{a} + {b} = {a} + {high} + {low} = {a + high} + {low} = {a + b}"
    return f"{a} + {b} = {a + b}"


def _sub_detail(a: int, b: int, rng: random.Random) -> str:
    """``a - b = d``, sometimes taking ``b`` away in two parts."""
    high, low = _split_leading(b)
    if abs(a) >= 10 and b >= 10 and low and rng.random() < 0.5:
        return f"{a} - {b} = {a} - {high} - {low} = {a - high} - {low} = {a - b}"
    return f"{a} - {b} = {a - b}"


def _mul_detail(a: int, b: int) -> str:
    """``|a| × |b|`` worked by splitting the second factor, for products too big to just know."""
    x, y = abs(a), abs(b)
    if x < 10 or y < 10 or (x < 13 and y < 13):
        return f"{x} * {y} = {x * y}"
    if y > x:
        x, y = y, x
    high = y - y % 10 ** (len(str(y)) - 1)
    low = y - high
    if not low:
        return f"{x} * {y} = {x * y}"
    return f"{x} * {y} = {x} * {high} + {x} * {low} = {x * high} + {x * low} = {x * y}"


# ---------------------------------------------------------------------------------------------------------------
# Expressions: a small parser and a step-by-step evaluator that follows the order of operations


@dataclass
class _Num:
    value: Fraction


@dataclass
class _Var:
    name: str


@dataclass
class _Neg:
    operand: object


@dataclass
class _Paren:
    inner: object


@dataclass
class _Bin:
    op: str
    left: object
    right: object


_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z])|([-+*/()]))")


def _tokenize(text: str) -> list[str]:
    tokens, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise _Unsolvable(f"unexpected character at {text[pos : pos + 10]!r}")
        tokens.append(m.group(m.lastindex))
        pos = m.end()
    return tokens


class _Parser:
    """Recursive descent: expr := term (+|- term)*; term := unary (*|/ unary)*; unary := -unary | atom."""

    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.pos = 0

    def parse(self):
        node = self.expr()
        if self.pos != len(self.tokens):
            raise _Unsolvable(f"trailing tokens {self.tokens[self.pos :]}")
        return node

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> str:
        if self.pos >= len(self.tokens):
            raise _Unsolvable("unexpected end of expression")
        self.pos += 1
        return self.tokens[self.pos - 1]

    def expr(self):
        node = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            node = _Bin(op, node, self.term())
        return node

    def term(self):
        node = self.unary()
        while self.peek() in ("*", "/"):
            op = self.take()
            node = _Bin(op, node, self.unary())
        return node

    def unary(self):
        if self.peek() == "-":
            self.take()
            operand = self.unary()
            # "-5" is a negative number, not an operation to narrate.
            if isinstance(operand, _Num):
                return _Num(-operand.value)
            return _Neg(operand)
        if self.peek() == "+":
            self.take()
            return self.unary()
        return self.atom()

    def atom(self):
        token = self.take()
        if token.isdigit():
            return _Num(Fraction(int(token)))
        if token.isalpha():
            return _Var(token)
        if token == "(":
            inner = self.expr()
            if self.take() != ")":
                raise _Unsolvable("unbalanced parentheses")
            return _Paren(inner)
        raise _Unsolvable(f"unexpected token {token!r}")


def _render(node, right_operand: bool = False) -> str:
    if isinstance(node, _Num):
        return _paren_neg(node.value) if right_operand else _fmt(node.value)
    if isinstance(node, _Var):
        return node.name
    if isinstance(node, _Paren):
        return f"({_render(node.inner)})"
    if isinstance(node, _Neg):
        return f"-{_render(node.operand, right_operand=True)}"
    # A negative number that starts a right operand ("3 + (-7) * 2") still gets its parentheses.
    return f"{_render(node.left, right_operand)} {node.op} {_render(node.right, right_operand=True)}"


def _apply(op: str, a: Fraction, b: Fraction) -> Fraction:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0:
        raise _Unsolvable("division by zero")
    return a / b


def _simplify(node):
    """Fold what needs no narration: parentheses around a single number, and negating a number."""
    if isinstance(node, _Paren):
        inner = _simplify(node.inner)
        return inner if isinstance(inner, _Num) else _Paren(inner)
    if isinstance(node, _Neg):
        operand = _simplify(node.operand)
        return _Num(-operand.value) if isinstance(operand, _Num) else _Neg(operand)
    if isinstance(node, _Bin):
        return _Bin(node.op, _simplify(node.left), _simplify(node.right))
    return node


def _candidates(node, depth: int = 0, path: tuple = ()) -> list[tuple[tuple, tuple, _Bin]]:
    """Operations ready to evaluate (both operands are numbers), with a priority key and their path in the tree."""
    found = []
    if isinstance(node, _Bin):
        if isinstance(node.left, _Num) and isinstance(node.right, _Num):
            found.append(((-depth, 0 if node.op in "*/" else 1), path, node))
        found += _candidates(node.left, depth, path + ("left",))
        found += _candidates(node.right, depth, path + ("right",))
    elif isinstance(node, _Paren):
        found += _candidates(node.inner, depth + 1, path + ("inner",))
    elif isinstance(node, _Neg):
        found += _candidates(node.operand, depth, path + ("operand",))
    return found


def _replace(node, path: tuple, new):
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(node, _Bin):
        if head == "left":
            return _Bin(node.op, _replace(node.left, rest, new), node.right)
        return _Bin(node.op, node.left, _replace(node.right, rest, new))
    if isinstance(node, _Paren):
        return _Paren(_replace(node.inner, rest, new))
    return _Neg(_replace(node.operand, rest, new))


def _op_sentence(op: str, a: Fraction, b: Fraction, result: Fraction, rng: random.Random) -> str:
    """One operation with the working a careful person would show."""
    base = f"{_fmt(a)} {op} {_paren_neg(b)} = {_fmt(result)}"
    if op == "-" and b < 0:
        return f"{_fmt(a)} - {_paren_neg(b)} = {_fmt(a)} + {_fmt(-b)} = {_fmt(result)}"
    if op == "+" and b < 0:
        return f"{_fmt(a)} + {_paren_neg(b)} = {_fmt(a)} - {_fmt(-b)} = {_fmt(result)}"
    if op == "*" and a.denominator == 1 and b.denominator == 1:
        x, y = int(a), int(b)
        detail = _mul_detail(x, y)
        if (x < 0) != (y < 0) and x and y:
            sign = rng.choice(
                ["one factor is negative, so the product is negative", "the signs differ, so it is negative"]
            )
            return f"{detail}, and {sign}: {base}"
        if x < 0 and y < 0:
            return f"{detail}, and two negatives make a positive: {base}"
        return base if detail == f"{abs(x)} * {abs(y)} = {abs(x * y)}" else f"{detail}, so {base}"
    if op == "/" and result.denominator == 1 and b.denominator == 1 and a.denominator == 1:
        check = f"{_fmt(abs(result))} * {_fmt(abs(b))} = {_fmt(abs(a))}"
        return rng.choice([f"{base} (check: {check})", f"{base}, since {check}"])
    return base


def _count_negs(node) -> int:
    if isinstance(node, _Neg):
        return 1 + _count_negs(node.operand)
    if isinstance(node, _Paren):
        return _count_negs(node.inner)
    if isinstance(node, _Bin):
        return _count_negs(node.left) + _count_negs(node.right)
    return 0


def _evaluate_steps(tree, rng: random.Random) -> tuple[list[str], Fraction]:
    """Evaluate `tree` one operation at a time: parentheses first, then * and /, then + and -, leftmost first."""
    lines = []
    node = _simplify(tree)
    mixed = _has_ops(node, "*/") and _has_ops(node, "+-")
    step, seen_parens, seen_product = 0, False, False
    while not isinstance(node, _Num):
        options = _candidates(node)
        if not options:
            raise _Unsolvable("no operation to evaluate")
        (neg_depth, rank), path, target = min(options, key=lambda c: (c[0], c[1]))
        result = _apply(target.op, target.left.value, target.right.value)
        sentence = _op_sentence(target.op, target.left.value, target.right.value, result, rng)
        raw = _replace(node, path, _Num(result))
        node = _simplify(raw)
        step += 1
        if neg_depth < 0:
            lead = (
                rng.choice(["Still inside the parentheses: ", "Next, in the parentheses: "])
                if seen_parens
                else (rng.choice(["Inside the parentheses: ", "Parentheses first: ", "Start inside the brackets: "]))
            )
            seen_parens = True
        elif rank == 0 and mixed:
            lead = (
                rng.choice(["Next multiplication/division: ", "Then "])
                if seen_product
                else (rng.choice(["Multiplication and division come first: ", "First the * and / part: "]))
            )
            seen_product = True
        elif isinstance(node, _Num):
            lead = rng.choice(["Finally, ", "Last step: "]) if step > 1 else ""
        else:
            lead = rng.choice(["Then ", "Next, ", "Now "]) if step > 1 else ""
        line = f"{lead}{sentence}."
        if _count_negs(raw) > _count_negs(node):
            # A minus sign in front of parentheses that now hold a single number: say what it does.
            line += f" With the minus sign in front, {_render(raw)} becomes {_render(node)}."
        elif not isinstance(node, _Num):
            rest = _render(node)
            line += " " + rng.choice(
                [f"Now it reads {rest}.", f"The expression becomes {rest}.", f"That leaves {rest}."]
            )
        lines.append(line)
    return lines, node.value


def _has_ops(node, ops: str) -> bool:
    if isinstance(node, _Bin):
        return node.op in ops or _has_ops(node.left, ops) or _has_ops(node.right, ops)
    if isinstance(node, _Paren):
        return _has_ops(node.inner, ops)
    if isinstance(node, _Neg):
        return _has_ops(node.operand, ops)
    return False


def _has_parens(node) -> bool:
    if isinstance(node, _Paren):
        return True
    if isinstance(node, _Bin):
        return _has_parens(node.left) or _has_parens(node.right)
    if isinstance(node, _Neg):
        return _has_parens(node.operand)
    return False


# ---------------------------------------------------------------------------------------------------------------
# Task solvers: each returns (reasoning lines, final answer string) or raises _Unsolvable


def _solve_basic_arithmetic(item: TaskItem, rng: random.Random) -> tuple[list[str], str]:
    question = _raw_question(item).strip()
    m = re.match(r"^(?:Calculate|What is|Solve|Compute|Evaluate:)\s+(.+?)[.?]?$", question)
    if not m:
        raise _Unsolvable("unrecognised question")
    expression = m.group(1)
    tree = _Parser(expression).parse()
    lines = [
        rng.choice([f"I need to evaluate {expression}.", f"The expression is {expression}.", f"Evaluate {expression}."])
    ]
    simple = _simplify(tree)
    rules = []
    if _has_parens(simple):
        rules.append("parentheses first")
    if _has_ops(simple, "*/") and _has_ops(simple, "+-"):
        rules.append("multiplication and division before addition and subtraction")
    if len(rules) > 0:
        rules.append("left to right otherwise")
        lines.append(rng.choice(["Order of operations: ", "Following the usual order: "]) + "; ".join(rules) + ".")
    steps, value = _evaluate_steps(tree, rng)
    lines += steps
    if value.denominator != 1:
        # reasoning-gym's gold is floor-divided; an exact non-integer result cannot match it honestly.
        raise _Unsolvable("non-integer result")
    lines.append(rng.choice([f"So the value is {_fmt(value)}.", f"The result is {_fmt(value)}.", ""]))
    return lines, _fmt(value)


def _solve_chain_sum(item: TaskItem, rng: random.Random) -> tuple[list[str], str]:
    question = _raw_question(item).strip()
    m = re.search(r":\s*(.+?)\s*=\s*$", question)
    if not m:
        raise _Unsolvable("unrecognised question")
    tokens = m.group(1).split()
    if len(tokens) % 2 == 0 or not all(re.fullmatch(r"-?\d+", t) for t in tokens[::2]):
        raise _Unsolvable("not a chain of numbers")
    if not all(t in ("+", "-") for t in tokens[1::2]):
        raise _Unsolvable("unexpected operator")
    values = [int(t) for t in tokens[::2]]
    ops = ["+"] + tokens[1::2]
    signed = [v if op == "+" else -v for op, v in zip(ops, values, strict=True)]
    total = sum(signed)
    expression = m.group(1)

    lines = []
    style = rng.choice(["running", "running", "grouped"]) if len(values) >= 3 else "running"
    if style == "running":
        lines.append(rng.choice(["Work left to right, keeping a running total.", "Go term by term from the left.", ""]))
        running = values[0]
        lines.append(rng.choice([f"Start with {running}.", f"Begin at {running}."]))
        for op, v in zip(ops[1:], values[1:], strict=True):
            new = running + v if op == "+" else running - v
            if op == "+" and v < 0:
                lines.append(f"Adding {v} means subtracting {-v}: {running} - {-v} = {new}.")
            elif op == "-" and v < 0:
                lines.append(f"Subtracting {v} means adding {-v}: {running} + {-v} = {new}.")
            elif op == "+" and running >= 0:
                lines.append(rng.choice(["", "Add: ", f"Add {v}: "]) + _add_detail(running, v, rng) + ".")
            elif op == "+":
                lines.append(f"{running} + {v} = {new}.")
            else:
                lines.append(rng.choice(["", f"Subtract {v}: ", "Take away: "]) + _sub_detail(running, v, rng) + ".")
            running = new
        plus = [s for s in signed if s > 0]
        minus = [-s for s in signed if s < 0]
        if len(values) >= 3 and plus and minus:
            lines.append(
                f"Check by grouping: the parts added come to {_sum_text(plus)}, the parts subtracted to "
                f"{_sum_text(minus)}, and {sum(plus)} - {sum(minus)} = {total}. ✓"
            )
        elif len(values) == 2:
            back = total - signed[1]
            lines.append(
                f"Check: {total} {'-' if signed[1] >= 0 else '+'} {abs(signed[1])} = {back}, the first number. ✓"
            )
    else:
        plus = [s for s in signed if s > 0]
        minus = [-s for s in signed if s < 0]
        lines.append(
            rng.choice(
                [
                    "Group the terms: add everything positive, then subtract the rest.",
                    "It is easier to collect the additions and the subtractions separately.",
                ]
            )
        )
        p, q = sum(plus), sum(minus)
        if plus:
            lines.append(f"Added: {_sum_text(plus)}.")
        if minus:
            lines.append(f"Subtracted: {_sum_text(minus)}.")
        lines.append(f"{p} - {q} = {total}.")
        # The check is the other method: left to right.
        running, path = signed[0], [str(signed[0])]
        for s in signed[1:]:
            running += s
            path.append(str(running))
        lines.append(f"Check left to right: {' -> '.join(path)}. ✓")
    lines.insert(0, rng.choice([f"We need {expression}.", f"The sum is {expression}.", ""]))
    return lines, str(total)


def _linear(node) -> tuple[Fraction, Fraction]:
    """(coefficient, constant) of a linear expression in one variable."""
    if isinstance(node, _Num):
        return Fraction(0), node.value
    if isinstance(node, _Var):
        return Fraction(1), Fraction(0)
    if isinstance(node, _Paren):
        return _linear(node.inner)
    if isinstance(node, _Neg):
        a, b = _linear(node.operand)
        return -a, -b
    a1, b1 = _linear(node.left)
    a2, b2 = _linear(node.right)
    if node.op == "+":
        return a1 + a2, b1 + b2
    if node.op == "-":
        return a1 - a2, b1 - b2
    if node.op == "*":
        if a1 and a2:
            raise _Unsolvable("not linear")
        return a1 * b2 + a2 * b1, b1 * b2
    if a2 or b2 == 0:
        raise _Unsolvable("division by the variable or zero")
    return a1 / b2, b1 / b2


def _var_term(a: Fraction, var: str) -> str:
    if a == 1:
        return var
    if a == -1:
        return f"-{var}"
    return f"{_fmt(a)}*{var}"


def _solve_simple_equations(item: TaskItem, rng: random.Random) -> tuple[list[str], str]:
    question = _raw_question(item).strip()
    m = re.match(r"^(?:Find the value of|Solve for|Determine the value of)\s+([A-Za-z])\b[^:]*:\s*(.+)$", question)
    if not m:
        raise _Unsolvable("unrecognised question")
    var, equation = m.group(1), m.group(2).strip()
    sides = equation.split("=")
    if len(sides) != 2:
        raise _Unsolvable("not one equation")
    left, right = _Parser(sides[0]).parse(), _Parser(sides[1]).parse()
    if _uses_other_var(left, var) or _uses_other_var(right, var):
        raise _Unsolvable("another variable")
    a, b = _linear(left)
    a2, r = _linear(right)
    if a2:
        raise _Unsolvable("variable on the right")
    if a == 0:
        raise _Unsolvable("no variable")
    term = _var_term(a, var)
    lines = [
        rng.choice(
            [f"Solve {equation} for {var}.", f"We want the {var} that makes {equation} true.", f"Equation: {equation}."]
        )
    ]
    if b:
        rhs = r - b
        if b > 0:
            move = rng.choice(
                [
                    f"Subtract {_fmt(b)} from both sides",
                    f"Move the {_fmt(b)} to the right by subtracting it",
                    f"Take {_fmt(b)} away from both sides",
                ]
            )
            lines.append(f"{move}: {term} = {_fmt(r)} - {_fmt(b)} = {_fmt(rhs)}.")
        else:
            move = rng.choice(
                [f"Add {_fmt(-b)} to both sides", f"Move the -{_fmt(-b)} to the right by adding {_fmt(-b)}"]
            )
            lines.append(f"{move}: {term} = {_fmt(r)} + {_fmt(-b)} = {_fmt(rhs)}.")
    else:
        rhs = r
        lines.append(f"There is no constant term on the left, so {term} = {_fmt(rhs)}.")
    x = rhs / a
    if a == -1:
        lines.append(f"Multiply both sides by -1: {var} = {_fmt(x)}.")
    elif a != 1:
        verb = rng.choice(["Divide both sides by", "Now divide by"])
        lines.append(f"{verb} {_fmt(a)}: {var} = {_fmt(rhs)} / {_paren_neg(a)} = {_fmt(x)}.")
    if x.denominator != 1:
        raise _Unsolvable("non-integer solution")
    # Check by substituting into the equation as given.
    product = a * x
    if product + b != r:
        raise _Unsolvable("check failed")
    sign = "+" if b > 0 else "-"
    if a in (1, -1):
        if b:
            lines.append(f"Check: {_fmt(product)} {sign} {_fmt(abs(b))} = {_fmt(r)}. ✓")
    elif b:
        lines.append(
            f"Check: {_fmt(a)} * {_paren_neg(x)} {sign} {_fmt(abs(b))} = {_fmt(product)} {sign} {_fmt(abs(b))} "
            f"= {_fmt(r)}. ✓"
        )
    else:
        lines.append(f"Check: {_fmt(a)} * {_paren_neg(x)} = {_fmt(product)}. ✓")
    return lines, _fmt(x)


def _uses_other_var(node, var: str) -> bool:
    if isinstance(node, _Var):
        return node.name != var
    if isinstance(node, _Bin):
        return _uses_other_var(node.left, var) or _uses_other_var(node.right, var)
    if isinstance(node, _Paren):
        return _uses_other_var(node.inner, var)
    if isinstance(node, _Neg):
        return _uses_other_var(node.operand, var)
    return False


# name -> (legs, plural). Common knowledge, kept here so the solver states facts, not reasoning-gym's metadata.
_ANIMALS: dict[str, tuple[int, str]] = {
    "snake": (0, "snakes"),
    "sea slug": (0, "sea slugs"),
    "jellyfish": (0, "jellyfish"),
    "flatworm": (0, "flatworms"),
    "leech": (0, "leeches"),
    "chicken": (2, "chickens"),
    "bird": (2, "birds"),
    "human": (2, "humans"),
    "duck": (2, "ducks"),
    "dog": (4, "dogs"),
    "cat": (4, "cats"),
    "cow": (4, "cows"),
    "horse": (4, "horses"),
    "lion": (4, "lions"),
    "elephant": (4, "elephants"),
    "giraffe": (4, "giraffes"),
    "tiger": (4, "tigers"),
    "deer": (4, "deer"),
    "sheep": (4, "sheep"),
    "starfish": (5, "starfish"),
    "insect": (6, "insects"),
    "ant": (6, "ants"),
    "butterfly": (6, "butterflies"),
    "beetle": (6, "beetles"),
    "bee": (6, "bees"),
    "wasp": (6, "wasps"),
    "grasshopper": (6, "grasshoppers"),
    "cricket": (6, "crickets"),
    "cockroach": (6, "cockroaches"),
    "praying mantis": (6, "praying mantises"),
    "firefly": (6, "fireflies"),
    "spider": (8, "spiders"),
    "scorpion": (8, "scorpions"),
    "crab": (10, "crabs"),
    "lobster": (10, "lobsters"),
    "shrimp": (10, "shrimp"),
    "woodlouse": (14, "woodlice"),
}
_LEG_NOTES = {"starfish": " (its five arms count as legs)", "crab": " (counting the claws)"}


def _animal(name: str, count: int) -> str:
    if name in _ANIMALS:
        return name
    # reasoning-gym pluralises by adding "s" ("deers", "praying mantiss").
    if count > 1 and name.endswith("s") and name[:-1] in _ANIMALS:
        return name[:-1]
    if count > 1 and name.endswith("es") and name[:-2] in _ANIMALS:
        return name[:-2]
    raise _Unsolvable(f"unknown animal {name!r}")


def _solve_leg_counting(item: TaskItem, rng: random.Random) -> tuple[list[str], str]:
    question = _raw_question(item)
    m = re.search(r"if you have (.+?)\?\s*$", question.strip(), re.S)
    if not m:
        raise _Unsolvable("unrecognised question")
    groups = []
    for part in m.group(1).split(", "):
        pm = re.fullmatch(r"(\d+) ([a-z ]+)", part.strip())
        if not pm:
            raise _Unsolvable(f"unrecognised animal count {part!r}")
        count = int(pm.group(1))
        groups.append((count, _animal(pm.group(2), count)))

    lines = [
        rng.choice(
            [
                "Count the legs for each kind of animal, then add them up.",
                "Go through the animals one kind at a time.",
                "For each animal: number of animals times legs per animal.",
            ]
        )
    ]
    products = []
    for count, name in groups:
        legs, plural = _ANIMALS[name]
        label = f"{count} {plural if count != 1 else name}"
        note = _LEG_NOTES.get(name, "")
        if legs == 0:
            lines.append(f"- {label}: {rng.choice([f'{plural} have no legs', f'a {name} has no legs'])}, so 0.")
        elif count == 1:
            lines.append(f"- {label}: {legs} legs{note}.")
        else:
            lines.append(f"- {label}: {legs} legs each{note}, {count} * {legs} = {count * legs}.")
        products.append(count * legs)
    total = sum(products)
    if len(products) > 1:
        if rng.random() < 0.5:
            running, steps = products[0], []
            for p in products[1:]:
                steps.append(f"{running} + {p} = {running + p}")
                running += p
            lines.append(rng.choice(["Adding up: ", "Running total: "]) + ", ".join(steps) + ".")
        else:
            lines.append(f"Total: {' + '.join(map(str, products))} = {total}.")
    # Check by a different grouping: animals with the same number of legs together.
    by_legs: dict[int, int] = {}
    for count, name in groups:
        by_legs[_ANIMALS[name][0]] = by_legs.get(_ANIMALS[name][0], 0) + count
    legged = [(legs, n) for legs, n in sorted(by_legs.items()) if legs]
    if len(by_legs) < len(groups) and len(legged) >= 2:
        parts = [f"{n} animals with {legs} legs give {n * legs}" for legs, n in legged]
        regroup = " + ".join(str(n * legs) for legs, n in legged)
        lines.append(f"Check, grouping by legs per animal: {'; '.join(parts)}; {regroup} = {total}. ✓")
    return lines, str(total)


def _factorize(n: int) -> dict[int, int]:
    factors, p = {}, 2
    while p * p <= n:
        while n % p == 0:
            factors[p] = factors.get(p, 0) + 1
            n //= p
        p += 1
    if n > 1:
        factors[n] = factors.get(n, 0) + 1
    return factors


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % p for p in range(2, math.isqrt(n) + 1))


def _factor_text(n: int, factors: dict[int, int]) -> str:
    if n == 1:
        return "1 has no prime factors"
    if factors == {n: 1}:
        # Saying "prime" needs a reason: no prime up to the square root divides it.
        small = [p for p in range(2, math.isqrt(n) + 1) if _is_prime(p)]
        if not small:
            return f"{n} is prime"
        nxt = next(q for q in range(small[-1] + 1, n + 1) if _is_prime(q))
        tried = ", ".join(map(str, small[:-1])) + f" or {small[-1]}" if len(small) > 1 else str(small[0])
        return f"{n} is prime: it is not divisible by {tried}, and {nxt} * {nxt} = {nxt * nxt} > {n}"
    # Peel off the smallest prime each time, as done by hand: 84 = 2 * 42 = 2^2 * 21 = 2^2 * 3 * 7.
    chain, peeled, rest = [], {}, n
    while not _is_prime(rest) and rest > 1:
        p = next(q for q in range(2, rest + 1) if rest % q == 0)
        peeled[p] = peeled.get(p, 0) + 1
        rest //= p
        powers = [f"{q}^{e}" if e > 1 else str(q) for q, e in peeled.items()]
        chain.append(" * ".join(powers + ([str(rest)] if rest > 1 else [])))
    final = " * ".join(f"{q}^{e}" if e > 1 else str(q) for q, e in sorted(factors.items()))
    if not chain or chain[-1] != final:
        chain.append(final)
    return f"{n} = " + " = ".join(chain)


def _euclid_lines(a: int, b: int) -> list[str]:
    x, y = max(a, b), min(a, b)
    lines = []
    while y:
        q, r = divmod(x, y)
        lines.append(f"{x} = {q} * {y} + {r}")
        x, y = y, r
    return lines


def _solve_gcd(item: TaskItem, rng: random.Random) -> tuple[list[str], str]:
    question = _raw_question(item)
    m = re.search(r"numbers:\s*([\d,\s]+?)\.", question)
    if not m:
        raise _Unsolvable("unrecognised question")
    numbers = [int(x) for x in m.group(1).split(",")]
    if len(numbers) < 2 or min(numbers) < 1:
        raise _Unsolvable("need two or more positive numbers")
    g = math.gcd(*numbers)
    lines = []
    # Factorizing by hand is only natural for small numbers; Euclid's algorithm scales.
    if max(numbers) <= 200 and rng.random() < 0.5:
        lines.append(
            rng.choice(
                [
                    "Factor each number into primes.",
                    "Use prime factorizations.",
                    f"The numbers are small ({', '.join(map(str, numbers))}), so factor them.",
                ]
            )
        )
        facts = [_factorize(n) for n in numbers]
        for n, f in zip(numbers, facts, strict=True):
            lines.append(_factor_text(n, f) + ".")
        common = {p: min(f.get(p, 0) for f in facts) for p in facts[0]}
        common = {p: e for p, e in common.items() if e}
        if not common:
            lines.append("They have no prime factor in common, so the GCD is 1.")
        else:
            shared = " * ".join(f"{p}^{e}" if e > 1 else str(p) for p, e in sorted(common.items()))
            if shared == str(g):
                lines.append(f"The only prime factor they share is {g} (to the first power), so the GCD is {g}.")
            else:
                lines.append(f"Common primes, each to the smallest power: {shared} = {g}.")
    else:
        listed = ", ".join(map(str, numbers))
        lines.append(
            rng.choice(
                [
                    f"Use the Euclidean algorithm on {listed}: divide, keep the remainder, repeat.",
                    "Euclid's algorithm: replace the larger number by the remainder until it is 0.",
                    f"To find the GCD of {listed}, divide the larger by the smaller and continue with "
                    "the remainder until it is 0.",
                ]
            )
        )
        current = numbers[0]
        for n in numbers[1:]:
            steps = _euclid_lines(current, n)
            if len(numbers) > 2:
                lines.append(f"gcd({current}, {n}):")
            lines += [s + "." for s in steps]
            nxt = math.gcd(current, n)
            lines.append(f"The remainder is now 0, so the GCD is the last divisor: gcd({current}, {n}) = {nxt}.")
            current = nxt
    if g > 1:
        quotients = [n // g for n in numbers]
        lines.append(
            "Check: "
            + ", ".join(f"{n} = {g} * {q}" for n, q in zip(numbers, quotients, strict=True))
            + f", and {', '.join(map(str, quotients))} have no common factor other than 1. ✓"
        )
    return lines, str(g)


_BASE_NAMES = {"binary": 2, "hexadecimal": 16}
_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"


def _base_of(name: str) -> int:
    if name in _BASE_NAMES:
        return _BASE_NAMES[name]
    m = re.fullmatch(r"base-(\d+)", name)
    if not m or not 2 <= int(m.group(1)) <= 36:
        raise _Unsolvable(f"unknown base {name!r}")
    return int(m.group(1))


def _base_label(base: int) -> str:
    return {2: "binary", 10: "decimal", 16: "hexadecimal"}.get(base, f"base {base}")


def _digit_note(digits: str) -> str:
    letters = sorted({d for d in digits if d.isalpha()})
    if not letters:
        return ""
    return " (" + ", ".join(f"{d} = {_DIGITS.index(d)}" for d in letters) + ")"


def _positional(digits: str, base: int) -> str:
    """``digits`` expanded by place value: ``1*16^2 + 10*16 + 3 = 256 + 160 + 3 = 419`` (zero digits left out)."""
    values = [_DIGITS.index(d) for d in digits]
    n = len(values)
    terms = [(v, n - 1 - i) for i, v in enumerate(values) if v]
    powers = " + ".join(f"{v}*{base}^{p}" if p > 1 else (f"{v}*{base}" if p == 1 else str(v)) for v, p in terms)
    value = int(digits, base)
    if len(terms) == 1:
        return f"{powers} = {value}"
    parts = " + ".join(str(v * base**p) for v, p in terms)
    return f"{powers} = {parts} = {value}"


def _to_decimal_lines(digits: str, base: int, rng: random.Random) -> tuple[list[str], int]:
    values = [_DIGITS.index(d) for d in digits]
    if any(v >= base for v in values):
        raise _Unsolvable("digit out of range")
    value = int(digits, base)
    label = _base_label(base)
    if len(values) == 1:
        return [f"{digits} in {label} is just {value}."], value
    if rng.random() < 0.5:
        lines = [
            f"Convert {digits} from {label} to decimal, reading the digits left to right: multiply by {base}, "
            f"then add the next digit{_digit_note(digits)}."
        ]
        acc = values[0]
        lines.append(f"Start with {acc}.")
        for v in values[1:]:
            lines.append(f"{acc} * {base} + {v} = {acc * base + v}.")
            acc = acc * base + v
        return lines, value
    intro = rng.choice(
        [
            f"Expand {digits} ({label}) by place value{_digit_note(digits)}:",
            f"Each digit of {digits} times its power of {base}{_digit_note(digits)}:",
        ]
    )
    return [intro, _positional(digits, base) + "."], value


def _from_decimal_lines(value: int, base: int) -> tuple[list[str], str]:
    lines, remainders, n = [], [], value
    while n:
        q, r = divmod(n, base)
        written = f", written {_DIGITS[r]}" if r >= 10 else ""
        lines.append(f"{n} / {base} = {q} remainder {r}{written}")
        remainders.append(_DIGITS[r])
        n = q
    return lines, "".join(reversed(remainders)) or "0"


def _solve_base_conversion(item: TaskItem, rng: random.Random) -> tuple[list[str], str]:
    question = _raw_question(item)
    m = re.search(
        r"convert the (binary|hexadecimal|base-\d+) number ([0-9a-z]+) to (binary|hexadecimal|base-\d+)", question
    )
    if not m:
        raise _Unsolvable("unrecognised question")
    source, digits, target = _base_of(m.group(1)), m.group(2), _base_of(m.group(3))
    lines = []
    if source == 10:
        value = int(digits)
        lines.append(f"{digits} is already a decimal number.")
    else:
        to_dec, value = _to_decimal_lines(digits, source, rng)
        lines += to_dec
        lines.append(rng.choice([f"So the value is {value} in decimal.", f"That is {value} in base 10.", ""]))
    if target == 10:
        if source != 10 and len(digits) > 1:
            # Converting back by repeated division is the natural check.
            back_lines, back = _from_decimal_lines(value, source)
            lines.append(
                f"Check by converting {value} back to {_base_label(source)}: "
                + "; ".join(back_lines)
                + f"; the remainders read upward give {back}. ✓"
            )
        return lines, str(value)
    label = _base_label(target)
    lines.append(
        rng.choice(
            [
                f"Now convert {value} to {label} by repeated division by {target}:",
                f"To write {value} in {label}, divide by {target} repeatedly and keep the remainders:",
            ]
        )
    )
    div_lines, answer = _from_decimal_lines(value, target)
    lines += [line + "." for line in div_lines]
    lines.append(
        rng.choice(
            [f"Reading the remainders from last to first: {answer}.", f"The remainders read bottom-up give {answer}."]
        )
    )
    if int(answer, target) != value:
        raise _Unsolvable("check failed")
    if len(answer) > 1:
        lines.append(f"Check: {answer} in {label}{_digit_note(answer)} is {_positional(answer, target)}. ✓")
    return lines, answer


_SOLVERS: dict[str, Callable[[TaskItem, random.Random], tuple[list[str], str]]] = {
    "chain_sum": _solve_chain_sum,
    "basic_arithmetic": _solve_basic_arithmetic,
    "simple_equations": _solve_simple_equations,
    "leg_counting": _solve_leg_counting,
    "gcd": _solve_gcd,
    "base_conversion": _solve_base_conversion,
}

_ANSWER_TEXTS = {
    "leg_counting": ["There are \\boxed{{{a}}} legs in total.", "The animals have \\boxed{{{a}}} legs altogether."],
    "gcd": ["The greatest common divisor is \\boxed{{{a}}}.", "GCD = \\boxed{{{a}}}"],
    "simple_equations": ["The solution is \\boxed{{{a}}}.", "So the value is \\boxed{{{a}}}."],
    "base_conversion": ["The converted number is \\boxed{{{a}}}.", "In the target base it is \\boxed{{{a}}}."],
}
_GENERIC_ANSWERS = ["The answer is \\boxed{{{a}}}.", "The final answer is \\boxed{{{a}}}.", "\\boxed{{{a}}}"]


def solve(item: TaskItem) -> Solution | None:
    """A worked solution for `item`, or None (no solver for its task, an unparseable question, or a final answer
    that does not score 1.0 against the gold answer)."""
    solver = _SOLVERS.get(item.task)
    if solver is None:
        return None
    rng = random.Random(f"{item.task}|{item.difficulty}|{item.seed}|{item.question}")
    try:
        lines, answer = solver(item, rng)
    except (_Unsolvable, ArithmeticError, ValueError):
        return None
    template = rng.choice(_ANSWER_TEXTS.get(item.task, []) + _GENERIC_ANSWERS)
    answer_text = template.format(a=answer)
    # Never hand out a wrong trace: the answer must score 1.0 with the task's own scorer.
    if score_answer(item, answer_text) < 1.0:
        return None
    return Solution(reasoning=_join(lines), answer_text=answer_text)
