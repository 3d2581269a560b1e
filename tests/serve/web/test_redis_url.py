"""``--redis-url``: the three forms read strictly, wrong ones named at startup, no password
shown anywhere."""

from __future__ import annotations

import pytest

from serve.web.redis_url import CLUSTER, PLAIN, SENTINEL, parse_redis_url, redact
from serve.web.server import main
from serve.web.settings import settings_from_env


def test_a_single_redis():
    target = parse_redis_url("redis://127.0.0.1:6380/2")
    assert (target.kind, target.hosts, target.db, target.tls) == (PLAIN, (("127.0.0.1", 6380),),
                                                                  2, False)
    assert parse_redis_url("redis://cache.internal").hosts == (("cache.internal", 6379),)
    assert parse_redis_url("rediss://[::1]:6379/0").hosts == (("::1", 6379),)
    assert parse_redis_url("rediss://[::1]:6379/0").tls


def test_a_sentinel_service():
    target = parse_redis_url("redis+sentinel://:s3cret@h1:26379,h2:26380,h3:26381/chat/3")
    assert target.kind == SENTINEL
    assert target.hosts == (("h1", 26379), ("h2", 26380), ("h3", 26381))
    assert (target.service, target.db, target.password) == ("chat", 3, "s3cret")
    assert parse_redis_url("redis+sentinel://h1:26379/chat").db == 0
    assert "s3cret" not in repr(target) and "s3cret" not in target.describe()


def test_a_cluster():
    target = parse_redis_url("redis+cluster://user:pw@10.0.0.1:7000,10.0.0.2:7001")
    assert target.kind == CLUSTER
    assert target.hosts == (("10.0.0.1", 7000), ("10.0.0.2", 7001))
    assert (target.username, target.password, target.db) == ("user", "pw", 0)


@pytest.mark.parametrize(("url", "problem"), [
    ("localhost:6379", "scheme"),
    ("http://h:1/0", "scheme"),
    ("redis://", "no host"),
    ("redis://h1:1,h2:2/0", "several hosts"),
    ("redis://h:0/0", "port"),
    ("redis://h:99999/0", "port"),
    ("redis://h:port/0", "port"),
    ("redis://h:6379/zero", "database"),
    ("redis://h:6379/0/1", "too many"),
    ("redis://h:6379/0?ssl=1", "query"),
    ("redis://bad_host!:6379", "host name"),
    ("redis+sentinel://h1:26379,h2:26380", "Sentinel service"),
    ("redis+sentinel://h1,h2/chat", "needs a port"),
    ("redis+sentinel://h1:1,h1:1/chat", "twice"),
    ("redis+sentinel://h1:1/ch at/0", "Sentinel service"),
    ("redis+cluster://h1:7000/chat", "only database 0"),
])
def test_a_wrong_url_is_named(url, problem):
    with pytest.raises(ValueError, match=problem):
        parse_redis_url(url)


def test_the_password_is_never_in_an_error():
    for url in ("redis://:hunter2@h:99999/0", "redis+sentinel://u:hunter2@h1:1",
                "ftp://:hunter2@h"):
        with pytest.raises(ValueError) as error:
            parse_redis_url(url)
        assert "hunter2" not in str(error.value)
    assert redact("redis://u:hunter2@h:1/0") == "redis://***@h:1/0"
    assert redact("redis://h:1/0") == "redis://h:1/0"


def test_settings_check_the_url_and_the_cluster_limits():
    settings_from_env({"XIAOX_REDIS_URL": "redis+cluster://h1:7000,h2:7001"})
    with pytest.raises(ValueError, match="scheme"):
        settings_from_env({"XIAOX_REDIS_URL": "redis+sentinal://h1:1/chat"})
    with pytest.raises(ValueError, match="not supported with redis\\+cluster"):
        settings_from_env({"XIAOX_REDIS_URL": "redis+cluster://h1:7000",
                           "XIAOX_REDIS_WAIT_REPLICAS": "1"})
    with pytest.raises(ValueError, match="send_wait_seconds"):
        settings_from_env({"XIAOX_SEND_WAIT_SECONDS": "0"})


def test_a_bad_url_is_a_startup_error_not_a_traceback(capsys):
    assert main(["--redis-url", "redis+sentinel://:hunter2@h1:26379"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m serve: ") and "Sentinel service" in err
    assert "Traceback" not in err and "hunter2" not in err
