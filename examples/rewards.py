"""Example reward functions for `reward.function: examples.rewards:NAME` (run from the repo root).

A reward function takes the prompts and the responses, two lists of strings, and returns
one float per response.
"""


def brevity(prompts: list[str], responses: list[str]) -> list[float]:
    """Prefers answers of about twelve words."""
    return [-abs(len(r.split()) - 12) / 12 for r in responses]


def vader_positive(prompts: list[str], responses: list[str]) -> list[float]:
    """VADER's compound sentiment of the response, in [-1, 1]."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    return [analyzer.polarity_scores(r)["compound"] for r in responses]
