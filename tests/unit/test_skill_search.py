"""BM25 over skills' names and descriptions (``goclaw.skills.search``)."""

from __future__ import annotations

import pytest

from goclaw.skills.search import SkillIndex, tokens

#: Thirty made-up skills, as an agent with a good many would see them.
SKILLS = [
    ("text_stats", "Count the bytes, characters, words and lines of a text."),
    ("tally", "Add to a named counter that persists between calls."),
    ("url_check", "Fetch an http(s) URL and report its status and content."),
    ("currency_convert", "Convert an amount between currencies at today's exchange rate."),
    ("weather_now", "Current weather and temperature for a city."),
    ("weather_forecast", "Weather forecast for the next seven days in a city."),
    ("pdf_extract", "Extract the text of a PDF document."),
    ("image_resize", "Resize an image to a given width and height."),
    ("git_release", "Tag a git release and write its release notes."),
    ("release_notes", "Write release notes from a changelog."),
    ("sql_query", "Run a read-only SQL query against the reporting database."),
    ("csv_summary", "Summarise the columns of a CSV file."),
    ("json_format", "Pretty-print and validate a JSON document."),
    ("timezone_convert", "Convert a time between time zones."),
    ("unit_convert", "Convert between units of length, mass and volume."),
    ("dns_lookup", "Look up the DNS records of a domain."),
    ("whois", "Who registered a domain, and when it expires."),
    ("translate", "Translate a text between languages."),
    ("spell_check", "Find spelling mistakes in a text."),
    ("calendar_add", "Add an event to the team calendar."),
    ("email_draft", "Draft an email from a few bullet points."),
    ("slack_post", "Post a message to a Slack channel."),
    ("invoice_make", "Make an invoice PDF for a customer."),
    ("stock_price", "The latest price of a stock ticker."),
    ("deploy", "Deploy the service to production."),
    ("rollback", "Roll the service back to the previous deployment."),
    ("log_search", "Search the service logs for an error."),
    ("cron_explain", "Explain a cron schedule in plain words."),
    ("regex_test", "Test a regular expression against sample strings."),
    ("hash_file", "Compute the SHA-256 hash of a file."),
]


@pytest.fixture(scope="module")
def index():
    return SkillIndex(SKILLS)


@pytest.mark.parametrize(
    ("query", "best"),
    [
        ("convert dollars to euros at the exchange rate", "currency_convert"),
        ("how many words are in this text", "text_stats"),
        ("weather forecast for next week", "weather_forecast"),
        ("what is the weather right now", "weather_now"),
        ("get the text out of a pdf", "pdf_extract"),
        ("write release notes", "release_notes"),
        ("is this website up? check the URL status", "url_check"),
        ("DNS", "dns_lookup"),
        ("text stats", "text_stats"),
        ("SHA-256 of a file", "hash_file"),
    ],
)
def test_the_obvious_match_ranks_first(index, query, best):
    results = index.search(query)
    assert results, query
    assert results[0][0] == best, results


def test_results_are_best_first_and_limited(index):
    results = index.search("convert", limit=3)
    assert len(results) == 3
    scores = [score for _, score in results]
    assert scores == sorted(scores, reverse=True)
    assert all(score > 0 for score in scores)
    assert {name for name, _ in index.search("convert", limit=10)} == {
        "currency_convert",
        "timezone_convert",
        "unit_convert",
    }


def test_a_query_sharing_no_word_returns_nothing(index):
    assert index.search("quantum chromodynamics") == []
    assert index.search("") == []
    assert index.search("!!! ???") == []


def test_names_count_and_are_split_into_words(index):
    # "stats" appears only in the name text_stats.
    assert index.search("stats")[0][0] == "text_stats"
    # A name counts twice: the skill named for the word beats one that only mentions it.
    ranked = [
        name
        for name, _ in SkillIndex(
            [("deploy", "Ship the service."), ("ship_it", "Deploy the service, then ship it.")]
        ).search("deploy")
    ]
    assert ranked == ["deploy", "ship_it"]


def test_ties_are_broken_by_name():
    tied = SkillIndex([("beta", "same words here"), ("alpha", "same words here")])
    assert [name for name, _ in tied.search("words")] == ["alpha", "beta"]


def test_an_empty_index_finds_nothing():
    assert SkillIndex([]).search("anything") == []


def test_tokens_lower_case_and_split_on_punctuation_and_underscores():
    assert tokens("Text_Stats: count BYTES, words & lines!") == [
        "text",
        "stats",
        "count",
        "bytes",
        "words",
        "lines",
    ]
