"""Configuration: defaults with no file, TOML values, environment overrides, clear errors."""

import pytest

from common.config import ConfigError, load_config, parse_bytes, with_overrides


def test_defaults_work_with_no_file(tmp_path):
    config = load_config(environ={"HOME": str(tmp_path)})
    assert config.source == "defaults"
    assert config.controller.ipc_endpoint.startswith("ipc://") and config.controller.ipc_endpoint.endswith(
        "controller.sock"
    )
    assert config.controller.tcp == "" and not config.security.insecure
    assert config.cluster.workers >= 1 and config.cluster.worker_memory == 4 << 30


def test_file_values_and_environment_overrides(tmp_path):
    path = tmp_path / "flexpipe.toml"
    path.write_text(
        '[controller]\ntcp = "tcp://0.0.0.0:7700"\nheartbeat_interval_s = 2.0\n'
        '[cluster]\nworkers = 5\nworker_memory = "512MiB"\n'
    )
    config = load_config(
        path,
        environ={
            "FLEXPIPE_CLUSTER_WORKERS": "3",
            "FLEXPIPE_SECURITY_INSECURE": "true",
            "FLEXPIPE_CLUSTER_WORKER_MEMORY": "2GiB",
        },
    )
    assert config.controller.tcp == "tcp://0.0.0.0:7700" and config.controller.heartbeat_interval_s == 2.0
    assert config.cluster.workers == 3, "the environment wins over the file"
    assert config.cluster.worker_memory == 2 << 30 and config.security.insecure
    assert config.source == str(path)
    assert load_config(environ={"FLEXPIPE_CONFIG": str(path)}).cluster.workers == 5
    assert with_overrides(config, cluster={"workers": 7}).cluster.workers == 7


@pytest.mark.parametrize(
    "text,message",
    [
        ("[controler]\n", "unknown configuration sections"),
        ("[controller]\nport = 3\n", "unknown keys in [controller]"),
        ("[controller]\nheartbeat_interval_s = 0\n", "heartbeat_interval_s"),
        ("[cluster]\nworkers = 0\n", "invalid [cluster]"),
        ("[cluster\n", "not valid TOML"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(path, environ={})


def test_bad_overrides_and_missing_files_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="FLEXPIPE_SECURITY_INSECURE"):
        load_config(environ={"FLEXPIPE_SECURITY_INSECURE": "maybe", "HOME": str(tmp_path)})
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml", environ={})


@pytest.mark.parametrize(
    "value,expected", [(4096, 4096), ("512MiB", 512 << 20), ("1.5 GiB", 3 << 29), ("2GB", 2 * 10**9)]
)
def test_sizes(value, expected):
    assert parse_bytes(value) == expected


@pytest.mark.parametrize("value", ["lots", "-1", -5, "3 parsecs"])
def test_bad_sizes(value):
    with pytest.raises(ConfigError):
        parse_bytes(value)


def test_policy_settings_are_checked_field_by_field_and_models_get_their_own_bounds(tmp_path):
    import pytest

    from common.config import ConfigError, load_config

    path = tmp_path / "flexpipe.toml"
    for line, named in [
        ("interval_s = -1", "policy.interval_s must be > 0"),
        ('interval_s = "fast"', "policy.interval_s must be a finite number"),
        ("cooldown_s = nan", "policy.cooldown_s must be a finite number"),
        ("alpha = 2", "policy.alpha must be in [0, 1]"),
        ('mode = "auto"', "policy.mode must be 'flexpipe' or 'static'"),
        ("min_stages = 5", "min_stages <= max_stages"),
    ]:
        path.write_text(f"[policy]\n{line}\n")
        with pytest.raises(ConfigError, match=named.replace("[", r"\[").replace("]", r"\]")):
            load_config(path, environ={})
    path.write_text('[policy]\nmax_stages = 3\n[[policy.model]]\nname = "m"\nmax_replicas = 2\nmin_replicas = 0\n')
    config = load_config(path, environ={"FLEXPIPE_POLICY_COOLDOWN_S": "7.5"})
    assert config.policy.cooldown_s == 7.5
    assert config.policy.limits("m").max_replicas == 2 and config.policy.limits("m").min_replicas == 0
    assert config.policy.limits("other").max_stages == 3
    path.write_text("[[policy.model]]\nmax_replicas = 2\n")
    with pytest.raises(ConfigError, match="needs a name"):
        load_config(path, environ={})
