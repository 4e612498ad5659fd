"""etl.redact: foreign text is masked where a secret stands as a value; our own words never are."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from support import cli_env, copy_mappings, run_cli, seed

from etl import logs, redact
from etl.delivery.load import deliver, make_client
from etl.errors import FatalApiError, SourceError
from etl.model import Outgoing, Secret
from etl.monitor.outcome import safe_message
from etl.settings import DeliverySettings

ENDPOINT = "http://127.0.0.1:9/api/v1/s2s/event"  # MockTransport answers; nothing is dialled


@pytest.fixture(autouse=True)
def no_registered_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with an empty registry, and leaves none behind."""
    monkeypatch.setattr(redact, "_registered", ())


# --- foreign text ------------------------------------------------------------


def test_a_registered_secret_is_masked_where_it_stands_as_a_value() -> None:
    """The secret alone, quoted, after `:` or in a path is masked; inside a word it is not."""
    redact.register_secret("wrong")
    assert redact.foreign("invalid token: wrong") == "invalid token: ***"
    assert redact.foreign('{"token": "wrong"}') == '{"token": "***"}'
    assert redact.foreign("/keys/wrong/x") == "/keys/***/x"
    assert redact.foreign("wrongly formatted; headstrong") == "wrongly formatted; headstrong"


def test_every_token_query_value_is_masked_and_token_in_prose_is_not() -> None:
    """`token=VALUE` loses its value whatever it is; `token=;` in a sentence stays."""
    assert redact.foreign("GET /e?a=1&token=abc123&b=2") == "GET /e?a=1&token=***&b=2"
    assert redact.foreign("TOKEN=x%2Fy") == "TOKEN=***"
    assert redact.foreign("the URL contains token=; remove it") == (
        "the URL contains token=; remove it"
    )


def test_url_encoded_spellings_of_a_secret_are_masked() -> None:
    """A secret with characters URL-encoding changes is masked in both spellings."""
    redact.register_secret("a/b c+d")
    assert redact.foreign("raw a/b c+d, quoted a%2Fb%20c%2Bd, plus a%2Fb+c%2Bd") == (
        "raw ***, quoted ***, plus ***"
    )


def test_explicit_secrets_replace_the_registry() -> None:
    """`secrets=` masks those only; an empty tuple masks only token= values."""
    redact.register_secret("registered")
    assert redact.foreign("registered given", ["given"]) == "registered ***"
    assert redact.foreign("registered token=x", ()) == "registered token=***"


def test_a_secret_that_starts_with_a_symbol_is_masked_after_a_letter() -> None:
    """The word-boundary guard applies only to a secret's word-character edges."""
    redact.register_secret("-s3cr3t-")
    assert redact.foreign("key-s3cr3t-end") == "key***end"


def test_first_line_takes_the_first_line_masked_or_says_error() -> None:
    """One line of a foreign message, masked; `error` when there is nothing to say."""
    redact.register_secret("hunter2")
    assert redact.first_line(RuntimeError("denied for hunter2\nDETAIL: more")) == "denied for ***"
    assert redact.first_line(RuntimeError("")) == "error"
    assert redact.first_line(None) == "error"
    assert redact.first_line("  \n") == "error"


def test_mask_emails_blanks_every_address() -> None:
    """Addresses in a message become ***@***; the rest stays."""
    assert redact.mask_emails("dup ada@example.com and b.c+d@mail.ex.org here") == (
        "dup ***@*** and ***@*** here"
    )


@pytest.mark.parametrize(
    ("value", "masked"),
    [
        ("jane.doe@example.com", "j***@e***.com"),
        ("a@mail.example.co.uk", "a***@m***.uk"),
        ("Jane Doe", "J***"),
        ("", ""),
        ("not an@email", "n***"),
        (42, 42),
        (3.5, 3.5),
        (True, True),
        (None, None),
        (["beta", "x@y.org", ""], ["b***", "x***@y***.org", ""]),
        ({"a": "Zed"}, {"a": "Z***"}),
    ],
)
def test_mask_value_masks_text_and_keeps_numbers(value: Any, masked: Any) -> None:
    """Emails keep first letters and TLD, other text its first character, numbers stay."""
    assert redact.mask_value(value) == masked


# --- our own words are never masked (issue 15) --------------------------------


def _deliver_once(token: str, answer: httpx.Response) -> FatalApiError:
    settings = DeliverySettings(endpoint=ENDPOINT, concurrency=1)
    transport = httpx.MockTransport(lambda request: answer)
    event = Outgoing(key="k", event_id="e", body=b"{}", ref=None)
    with (
        make_client(settings, Secret(token), transport=transport) as client,
        pytest.raises(FatalApiError) as info,
    ):
        deliver([event], settings=settings, on_result=lambda result: None, client=client)
    return info.value


def test_a_token_that_is_a_word_leaves_our_401_message_whole() -> None:
    """Token `wrong`: the 401 message still reads "the token is wrong or missing"."""
    error = _deliver_once("wrong", httpx.Response(401, json={"message": "invalid token: wrong"}))
    assert "the token is wrong or missing — check HYPERENGAGE_TOKEN" in str(error)
    assert "?token=***" in str(error)


def test_a_server_quoting_a_word_token_is_masked_but_our_words_are_not() -> None:
    """A 422 echoing token `missing`: the server's echo is masked, our advice is intact."""
    body = {"message": "token missing is not valid here"}
    error = _deliver_once("missing", httpx.Response(422, json=body))
    assert "token *** is not valid here" in str(error)
    assert str(error).endswith("not retriable; fix what the server names")


def test_cli_prints_and_logs_our_message_whole_when_the_token_is_a_word(
    tmp_path: Path, sqlite_url: str, receiver: Any
) -> None:
    """`etl sync` with HYPERENGAGE_TOKEN=wrong exits 1 saying the token is wrong, unmasked."""
    seed(sqlite_url, n_users=2)
    copy_mappings(tmp_path / "mappings")
    result = run_cli(
        ["sync"], cli_env(tmp_path, sqlite_url, receiver.url, HYPERENGAGE_TOKEN="wrong")
    )
    assert result.exit_code == 1
    assert "error: POST " in result.stderr
    assert "answered HTTP 401: the token is wrong or missing" in result.stderr
    [failed] = [
        json.loads(line)
        for line in result.stderr.splitlines()
        if line.startswith("{") and '"run.failed"' in line
    ]
    assert "the token is wrong or missing" in failed["message"]
    assert "token=wrong" not in result.stderr


def test_outcome_message_keeps_our_words_and_masks_foreign_text() -> None:
    """safe_message: an EtlError's words stay (e-mails go); another exception is masked."""
    redact.register_secret("wrong")
    ours = safe_message(SourceError("the token is wrong for ada@example.com"))
    assert ours == "the token is wrong for ***@***"
    theirs = safe_message(RuntimeError("server said wrong at /x?token=abc"))
    assert theirs == "server said *** at /x?token=***"


def test_log_processor_masks_foreign_fields_only() -> None:
    """An EtlError field is printed as is; other exceptions, tracebacks and token= are masked."""
    redact.register_secret("wrong")
    event = logs.redact_secrets(
        None,
        "error",
        {
            "event": "run.failed",
            "message": SourceError("the token is wrong"),
            "error": RuntimeError("got wrong"),
            "exception": 'Traceback...\n  File "x", in f\nValueError: wrong',
            "url": "http://h/e?token=wrong",
            "nested": {"items": ["fine", "token=zzz"]},
        },
    )
    assert event["message"] == "the token is wrong"
    assert event["error"] == "RuntimeError: got ***"
    assert event["exception"].endswith("ValueError: ***")
    assert event["url"] == "http://h/e?token=***"
    assert event["nested"] == {"items": ["fine", "token=***"]}


def test_registering_secrets_from_threads_keeps_every_one() -> None:
    """The registry is written under a lock: secrets registered concurrently all stick."""
    names = [f"secret{i:03d}" for i in range(50)]
    threads = [threading.Thread(target=redact.register_secret, args=(n,)) for n in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert redact.foreign(" ".join(names)) == " ".join(["***"] * 50)


def test_structlog_output_never_shows_a_registered_secret_in_an_exception() -> None:
    """A logged foreign exception carrying the token comes out masked."""
    redact.register_secret("tok-12345678")
    with structlog.testing.capture_logs(processors=[logs.redact_secrets]) as captured:
        structlog.get_logger("t").error("x.failed", error=OSError("refused tok-12345678"))
    assert captured[0]["error"] == "OSError: refused ***"
