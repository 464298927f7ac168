"""A small labelled set for the semantic cache threshold: pairs of prompts that ask the same
thing in other words (paraphrases: one answer fits both) and pairs that do not (many on the same
topic, which is where a loose threshold would serve a wrong answer).

Used by the semantic tests and by `bench/cache_hit.py --threshold` (the table in docs/cache.md).
"""

from __future__ import annotations

PARAPHRASES: list[tuple[str, str]] = [
    ("What is the capital of France?", "What's the capital city of France?"),
    ("How do I reverse a list in Python?", "How can I reverse a Python list?"),
    ("What is the boiling point of water?", "At what temperature does water boil?"),
    ("Who wrote Pride and Prejudice?", "Who is the author of Pride and Prejudice?"),
    ("How many days are in a leap year?", "How many days does a leap year have?"),
    ("Translate 'good morning' into Spanish.", "How do you say 'good morning' in Spanish?"),
    ("What is the speed of light?", "How fast does light travel?"),
    ("How do I convert a string to an integer in Python?",
     "In Python, how can I turn a string into an int?"),
    ("Explain what photosynthesis is.", "Can you explain photosynthesis?"),
    ("What is the tallest mountain in the world?", "Which mountain is the highest on Earth?"),
    ("How can I make my laptop battery last longer?", "Tips to extend my laptop's battery life?"),
    ("What time zone is Tokyo in?", "Which time zone does Tokyo use?"),
    ("Give me a recipe for pancakes.", "How do I make pancakes?"),
    ("What are the symptoms of the flu?", "What symptoms does influenza cause?"),
    ("How do I undo the last git commit?", "How can I revert my most recent commit in git?"),
    ("Summarize the plot of Hamlet.", "Give me a summary of Hamlet's story."),
    ("What is the population of Canada?", "How many people live in Canada?"),
    ("Why is the sky blue?", "What makes the sky look blue?"),
    ("How do I sort a dictionary by value in Python?",
     "Sorting a Python dict by its values: how?"),
    ("What is the square root of 144?", "Compute the square root of 144."),
]

NON_PARAPHRASES: list[tuple[str, str]] = [
    ("What is the capital of France?", "What is the capital of Germany?"),
    ("How do I reverse a list in Python?", "How do I reverse a string in JavaScript?"),
    ("What is the boiling point of water?", "What is the freezing point of water?"),
    ("Who wrote Pride and Prejudice?", "Who wrote War and Peace?"),
    ("How many days are in a leap year?", "How many weeks are in a year?"),
    ("Translate 'good morning' into Spanish.", "Translate 'good night' into French."),
    ("What is the speed of light?", "What is the speed of sound?"),
    ("How do I convert a string to an integer in Python?",
     "How do I convert an integer to a string in Java?"),
    ("Explain what photosynthesis is.", "Explain how cellular respiration works."),
    ("What is the tallest mountain in the world?", "What is the longest river in the world?"),
    ("How can I make my laptop battery last longer?", "How do I replace my laptop's screen?"),
    ("What time zone is Tokyo in?", "What currency is used in Tokyo?"),
    ("Give me a recipe for pancakes.", "Give me a recipe for lasagna."),
    ("What are the symptoms of the flu?", "How is the flu vaccine made?"),
    ("How do I undo the last git commit?", "How do I create a new git branch?"),
    ("Summarize the plot of Hamlet.", "Who wrote Hamlet?"),
    ("What is the population of Canada?", "What is the population of Australia?"),
    ("Why is the sky blue?", "Why is grass green?"),
    ("How do I sort a dictionary by value in Python?", "How do I merge two dictionaries in Python?"),
    ("What is the square root of 144?", "What is 144 divided by 12 squared?"),
    ("Write a haiku about autumn.", "What is the GDP of Brazil?"),
    ("How do I bake sourdough bread?", "Explain quantum entanglement."),
]
