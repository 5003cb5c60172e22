"""Built-in chat instructions for self-distillation, written for this project (Apache-2.0).

An instruct model's denoiser is used on chat requests, so it learns best from the AR model's
own answers to chat requests. No instruction dataset is reachable offline, so this module
crosses request templates of the kinds users send (prose, dialogue, code, lists, questions,
summaries, rewrites) with subjects from many domains. The result is deterministic: the same
``seed`` gives the same list, so a resumed distillation lines up with its output file.
"""

from __future__ import annotations

import random

from ..errors import UsageError

SUBJECTS = """
volcanoes|coral reefs|black holes|the water cycle|photosynthesis|earthquakes|glaciers|tides|rainbows|
thunderstorms|the human heart|vaccines|sleep|memory|bees|octopuses|wolves|migratory birds|mushrooms|
deserts|rainforests|the Moon|Mars|comets|the Roman Empire|ancient Egypt|the printing press|
the steam engine|the Silk Road|the Renaissance|the Industrial Revolution|the invention of the telephone|
electricity|magnets|gravity|sound waves|light|atoms|chemical reactions|batteries|solar panels|
wind turbines|recycling|composting|climate change|ocean currents|plate tectonics|dinosaurs|fossils|
evolution|DNA|the immune system|nutrition|exercise|meditation|friendship|leadership|teamwork|
public speaking|time management|budgeting|saving money|compound interest|inflation|supply and demand|
small businesses|marketing|job interviews|learning a language|reading habits|libraries|museums|
bicycles|trains|airplanes|bridges|skyscrapers|roads|cities|villages|farming|bread baking|coffee|tea|
chocolate|cheese making|soup|pizza|gardening|houseplants|tomatoes|apple trees|beekeeping|fishing|
sailing|hiking|camping|mountain climbing|swimming|football|chess|music|the piano|the guitar|jazz|
painting|photography|poetry|theatre|films|video games|board games|the internet|email|passwords|
computer viruses|databases|web browsers|smartphones|robots|artificial intelligence|spreadsheets|
open source software|version control|cloud computing|encryption|operating systems|compilers|
recursion|sorting algorithms|binary numbers|prime numbers|fractions|probability|geometry|maps|
compasses|clocks|calendars|weather forecasts|snow|autumn leaves|the seasons|lighthouses|harbours|
castles|pyramids|deserts at night|the Arctic|penguins|elephants|whales|cats|dogs|horses|owls|ants|
spiders|butterflies|rivers|lakes|waterfalls|caves|islands|forests|grasslands|wetlands|soil|salt|
glass|paper|plastic|steel|wood|cotton|wool|first aid|hand washing|healthy breakfasts|drinking water|
fire safety|road safety|kindness|curiosity|patience|honesty|moving to a new city|starting school|
a first job|retirement|grandparents|birthdays|weddings|holidays|festivals|markets|restaurants|
hotels|airports|post offices|hospitals|schools|universities|science fairs|space travel|satellites|
telescopes|microscopes|the periodic table|vitamins|allergies|colds and flu|headaches|stress|
happiness|habits|goal setting|note taking|writing an essay|giving feedback|negotiation|customer service
"""

CHARACTERS = """
a baker|a nurse|a pilot|a teacher|a student|a librarian|a farmer|a detective|a robot|a chef|
a shopkeeper|a scientist|a painter|a taxi driver|a grandmother|a young boy|a lost tourist|
a lighthouse keeper|a firefighter|a musician|a software engineer|a doctor|a gardener|a sailor|
an astronaut|a mechanic|a journalist|a park ranger|a waiter|a customer|a new neighbour|a coach|
a museum guide|a receptionist|a travel agent|a student pilot|a veterinarian|a beekeeper|a potter
"""

SITUATIONS = """
a rainy afternoon|the first day of spring|a broken-down car|a missed train|a surprise party|
a power cut|a long queue|a lost key|a snowstorm|a job interview|a busy market|a quiet library|
a late-night bus|a camping trip|a school play|a cooking contest|a flooded basement|a found wallet|
a new puppy|a mysterious letter|an old map|a forgotten umbrella|a noisy neighbour|a locked door
"""

CODE_TASKS = """
reverses a string|checks whether a number is prime|returns the factorial of n|sums the digits of an integer|
counts the vowels in a string|finds the largest element of a list|removes duplicates from a list|
merges two sorted lists|computes the average of a list of numbers|converts Celsius to Fahrenheit|
checks whether two strings are anagrams|returns the n-th triangular number|flattens a nested list|
counts the words in a sentence|finds the second smallest number in a list|capitalises every word|
computes the greatest common divisor of two numbers|checks whether a year is a leap year|
returns the squares of the even numbers in a list|splits a list into chunks of size k|
reads a text file and counts its lines|validates a simple email address|rotates a list by k places|
returns the longest word in a sentence|computes a running total of a list|parses a date string|
converts a Roman numeral to an integer|computes the median of a list|checks balanced parentheses|
implements binary search on a sorted list|transposes a matrix|groups words by their first letter|
returns the intersection of two lists|generates the first n prime numbers|formats a number with commas|
counts how often each character appears in a string|checks whether a list is sorted|returns the n-th Fibonacci number|
converts a list of words to upper case|finds all indices of a value in a list|computes the dot product of two vectors|
checks whether a string contains only digits|returns the minimum and maximum of a list|shuffles a deck of cards|
simulates rolling two dice|computes the area of a circle|converts minutes to hours and minutes|
sorts a list of names alphabetically|removes punctuation from a string|builds a multiplication table|
finds the most common word in a text|checks whether a number is a perfect square|converts a binary string to an integer|
computes simple interest|returns the words of a sentence in reverse order|pads a string to a given width|
counts the lines in a CSV file that contain a given word|keeps a running maximum of a stream of numbers
"""

LANGUAGES = ["Python", "Python", "Python", "JavaScript", "Java", "C", "Go", "Rust", "SQL", "Bash"]

TEMPLATES = {
    "prose": [
        "Write a short paragraph about {subject}.",
        "Describe {subject} in a few sentences.",
        "Explain {subject} to a ten-year-old.",
        "Explain in plain words how {subject} works.",
        "Write a short story about {character} and {situation}.",
        "Continue this story in a few sentences: {character_cap} was thinking about {subject} when",
        "Write a diary entry by {character} about {situation}.",
        "Write a short poem about {subject}.",
        "Write a blog post introduction about {subject}.",
        "Describe a day in the life of {character}.",
        "Write an encouraging note to a friend who is worried about {situation}.",
        "Write a product description for a book about {subject}.",
    ],
    "dialogue": [
        "Write a short dialogue between {character} and {character2} about {subject}.",
        "Write a conversation in which {character} asks {character2} for help with {situation}.",
        "Two friends disagree about {subject}. Write their conversation.",
        "Write a phone call between {character} and {character2} during {situation}.",
        "Write an interview with {character} about {subject}.",
        "Role-play: you are {character}. A visitor asks you about {subject}. Answer them.",
    ],
    "code": [
        "Write a {language} function that {task}.",
        "Write a {language} function that {task}, with a docstring and an example.",
        "Show how to write a program in {language} that {task}.",
        "Write a {language} function that {task}, then explain how it works.",
        "Explain what this Python code does: `def f(xs): return [x for x in xs if x % 2 == 0]`",
        "How do I write a loop in {language} that prints the numbers from 1 to 10?",
        "What is the difference between a list and a dictionary in Python?",
        "Write a unit test for a function that {task}.",
        "Write a {language} script that {task} and prints the result.",
        "Write a {language} function that {task}. Use clear variable names and add comments.",
        "Give an example of a {language} function that {task}, and state its time complexity.",
    ],
    "list": [
        "List five facts about {subject}.",
        "Give three tips about {subject}, one per line.",
        "List the main steps to get started with {subject}.",
        "Give a numbered list of things to know about {subject}.",
        "List some advantages and disadvantages of {subject}.",
        "What should {character} pack for {situation}? Give a list.",
        "Suggest five questions a student could ask about {subject}.",
        "List four common mistakes people make with {subject}.",
    ],
    "qa": [
        "What is {subject}?",
        "Why is {subject} important?",
        "How does {subject} affect everyday life?",
        "What is the difference between {subject} and {subject2}?",
        "What would happen if there were no {subject}?",
        "Can you tell me something surprising about {subject}?",
        "How would you explain {subject} in one sentence?",
        "What are the most common questions people ask about {subject}? Answer one of them.",
        "Is {subject} related to {subject2}? Explain briefly.",
    ],
    "rewrite": [
        "Rewrite this sentence to sound more formal: \"I think {subject} is really cool and everyone should know about it.\"",
        "Make this sentence shorter: \"There are many different and interesting things that can be said about {subject}.\"",
        "Write a title for an article about {subject}.",
        "Write a tweet about {subject}.",
        "Write an email to {character} asking a question about {subject}.",
        "Turn this into a question: {subject_cap} is worth learning about.",
    ],
}


def _words(text: str) -> list[str]:
    return [w.strip() for w in text.replace("\n", "").split("|") if w.strip()]


# share of each kind in the mix (kinds whose combinations run out pass their share on)
KIND_WEIGHTS = {"prose": 0.25, "qa": 0.2, "list": 0.15, "code": 0.15, "dialogue": 0.15, "rewrite": 0.1}


def chat_instructions(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """``count`` distinct (kind, instruction) pairs mixed by ``KIND_WEIGHTS``, shuffled,
    deterministic in ``seed``."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise UsageError(f"the number of instructions must be a positive integer, got {count!r}")
    rng = random.Random(seed)
    subjects, characters, situations, tasks = map(_words, (SUBJECTS, CHARACTERS, SITUATIONS, CODE_TASKS))

    def sample(kind: str) -> str:
        subject, subject2 = rng.sample(subjects, 2)
        character, character2 = rng.sample(characters, 2)
        return rng.choice(TEMPLATES[kind]).format(
            subject=subject, subject2=subject2, subject_cap=subject[:1].upper() + subject[1:],
            character=character, character2=character2, character_cap=character[:1].upper() + character[1:],
            situation=rng.choice(situations), task=rng.choice(tasks), language=rng.choice(LANGUAGES),
        )

    seen: set[str] = set()
    out: list[tuple[str, str]] = []
    for kind, weight in sorted(KIND_WEIGHTS.items(), key=lambda kv: kv[1]):  # the scarce kinds first
        quota = round(weight * count) if kind != "prose" else count - len(out)
        quota = min(quota, count - len(out))
        misses = 0
        while quota > 0 and misses < 200:  # 200 duplicates in a row: this kind has run dry
            text = sample(kind)
            if text in seen:
                misses += 1
                continue
            misses = 0
            seen.add(text)
            out.append((kind, text))
            quota -= 1
    for kind in ("dialogue", "prose"):  # the roomiest kinds fill what the others could not
        misses = 0
        while len(out) < count and misses < 200:
            text = sample(kind)
            misses = misses + 1 if text in seen else 0
            if text not in seen:
                seen.add(text)
                out.append((kind, text))
    if len(out) < count:
        raise UsageError(f"only {len(out)} distinct instructions can be made, asked for {count}")
    rng.shuffle(out)
    return out
