"""Writes the quickstart task's data: turn a one-line calendar request into a fixed JSON record.

The base SmolLM2-135M-Instruct answers such requests in prose; after a short LoRA run it answers
with exactly {"title", "day", "time", "place"}, the time in 24-hour form ("3:30pm" -> "15:30").

The time is the one field the model must compute rather than copy, so the times are dealt, not drawn:
every hour from 7am to 10pm appears equally often in train and in eval, each in its am/pm form and in
both spellings ("3pm" and "3 pm"), with minutes :00, :15, :30 and :45; a few requests already say
"15:30". Deterministic (seeded): rerunning rewrites the same files.

Usage: python scripts/make_quickstart_data.py [--train 160] [--eval 40] [--out recipes/data]
"""

import argparse
import json
import random
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PEOPLE = ["Maria", "Tom", "Aisha", "Kenji", "Lena", "Omar", "Priya", "Lucas", "Sofia", "Ben", "Chloe", "Ivan",
          "Nora", "Diego", "Hana", "Sam", "Eva", "Raj", "Mila", "Jonas", "Ana", "Felix", "Yuki", "Grace"]
EVENTS = ["Lunch with {p}", "Coffee with {p}", "Call {p}", "Dinner with {p}", "Meeting with {p}",
          "Review the budget with {p}", "Dentist appointment", "Team standup", "Yoga class", "Piano lesson",
          "Interview with {p}", "Drinks with {p}", "Project kickoff", "Haircut", "Parent-teacher meeting"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
PLACES = ["Luigi's", "the office", "Room 4B", "the park", "Cafe Central", "home", "the library", "Studio 9",
          "the gym", "Blue Door Bistro", "the clinic", "Zoom", "the school", "Harbor Hall"]
TEMPLATES = [
    "{event} on {day} at {time} at {place}",
    "{event} on {day}, {time}, at {place}",
    "Schedule {event_l} for {day} at {time}, at {place}",
    "Add {event_l} on {day}, {time}, {place}",
    "Put {event_l} in my calendar: {day} {time} at {place}",
    "{day} at {time}: {event_l} at {place}",
    "Remind me: {event_l}, {day} {time}, location {place}",
]
INSTRUCTION = "Convert this calendar request to JSON:\n"
HOURS = range(7, 23)  # 7am .. 10pm
MINUTES = (0, 15, 30, 45)
# How the times are written: mostly am/pm, compact ("3pm") or spaced ("3 pm"); 1 in 14 already 24-hour ("15:30").
STYLES = ("compact",) * 9 + ("spaced",) * 4 + ("24h",)


def spoken_time(hour: int, minute: int, style: str) -> str:
    """How a person writes the time: '3pm', '3:30 pm' or (style '24h') '15:30'."""
    if style == "24h":
        return f"{hour:02d}:{minute:02d}"
    h12, suffix = hour % 12 or 12, "am" if hour < 12 else "pm"
    clock = f"{h12}" if minute == 0 else f"{h12}:{minute:02d}"
    return f"{clock} {suffix}" if style == "spaced" else f"{clock}{suffix}"


def dealt_times(n: int, rng: random.Random) -> list[tuple[int, int, str]]:
    """n (hour, minute, style) triples: hours dealt round-robin so each appears n/16 times (±1)."""
    hours = [HOURS[i % len(HOURS)] for i in range(n)]
    rng.shuffle(hours)
    return [(h, rng.choice(MINUTES), rng.choice(STYLES)) for h in hours]


def make_row(rng: random.Random, hour: int, minute: int, style: str) -> dict:
    person = rng.choice(PEOPLE)
    event = rng.choice(EVENTS).format(p=person)
    day, place = rng.choice(DAYS), rng.choice(PLACES)
    template = rng.choice(TEMPLATES)
    request = template.format(event=event, event_l=event[0].lower() + event[1:], day=day,
                              time=spoken_time(hour, minute, style), place=place)
    answer = json.dumps({"title": event, "day": day, "time": f"{hour:02d}:{minute:02d}", "place": place})
    return {"prompt": INSTRUCTION + request, "completion": answer}


def make_rows(n: int, rng: random.Random, seen: set) -> list[dict]:
    rows = []
    while len(rows) < n:
        for hour, minute, style in dealt_times(n - len(rows), rng):
            row = make_row(rng, hour, minute, style)
            if row["prompt"] not in seen:  # no request twice, and none shared by train and eval
                seen.add(row["prompt"])
                rows.append(row)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=160, help="training rows")
    parser.add_argument("--eval", type=int, default=40, help="held-out rows")
    parser.add_argument("--seed", type=int, default=20261203)
    parser.add_argument("--out", type=Path, default=REPO / "recipes" / "data")
    args = parser.parse_args(argv)
    rng, seen = random.Random(args.seed), set()
    held_out = make_rows(args.eval, rng, seen)
    train = make_rows(args.train, rng, seen)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, part in (("quickstart_train.jsonl", train), ("quickstart_eval.jsonl", held_out)):
        (args.out / name).write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
        print(f"wrote {len(part)} rows to {args.out / name}")


if __name__ == "__main__":
    main()
