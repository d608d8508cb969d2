use std::io::Write as _;

use serde_json::json;

use super::*;

fn load_str(
    toml: &str,
    env: &[(&str, &str)],
    flags: serde_json::Value,
) -> Result<AgentConfig, ConfigError> {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(toml.as_bytes()).unwrap();
    let env = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned()));
    load_from(Some(file.path()), &flags, env)
}

#[test]
fn defaults_need_no_file() {
    let config = load_from(None, &json!({}), Vec::new()).unwrap();
    assert_eq!(config, AgentConfig::default());
    assert_eq!(config.admin.addr.to_string(), "127.0.0.1:9464");
    assert_eq!(config.etcd.prefix, "/edgeward/v1");
    assert!(config.probe.enabled);
}

#[test]
fn file_then_env_then_flags() {
    let config = load_str(
        "node_name = \"from-file\"\n[admin]\naddr = \"127.0.0.1:1000\"\n[etcd]\nprefix = \"/file\"\n",
        &[("EDGEWARD_ADMIN_ADDR", "127.0.0.1:2000"), ("EDGEWARD_ETCD_PREFIX", "/env")],
        json!({"etcd": {"prefix": "/flag"}}),
    )
    .unwrap();
    assert_eq!(config.node_name.as_deref(), Some("from-file"));
    assert_eq!(config.admin.addr.to_string(), "127.0.0.1:2000");
    assert_eq!(config.etcd.prefix, "/flag");
}

#[test]
fn env_lists_take_commas_and_bools_parse() {
    let config = load_from(
        None,
        &json!({}),
        vec![
            (
                "EDGEWARD_ETCD_ENDPOINTS".to_owned(),
                "http://a:1,http://b:2".to_owned(),
            ),
            ("EDGEWARD_PROBE_ENABLED".to_owned(), "false".to_owned()),
            ("EDGEWARD_SHUTDOWN_TIMEOUT".to_owned(), "3s".to_owned()),
            ("EDGEWARD_CONFIG".to_owned(), "/ignored.toml".to_owned()),
            ("OTHER".to_owned(), "x".to_owned()),
        ],
    )
    .unwrap();
    assert_eq!(config.etcd.endpoints, vec!["http://a:1", "http://b:2"]);
    assert!(!config.probe.enabled);
    assert_eq!(config.shutdown_timeout, Duration::from_secs(3));
}

#[test]
fn unknown_key_in_file_is_named_with_the_file() {
    let err = load_str("[admin]\nadress = \"x\"\n", &[], json!({}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("`admin.adress`"), "{err}");
    assert!(err.starts_with("config file "), "{err}");
    assert!(!err.contains('\n'), "one line: {err}");
}

#[test]
fn wrong_type_in_file_is_named() {
    let err = load_str("[probe]\nenabled = \"yes\"\n", &[], json!({}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("probe.enabled"), "{err}");
    assert!(err.contains("config file"), "{err}");
}

#[test]
fn bad_env_var_is_named() {
    let err = load_from(
        None,
        &json!({}),
        vec![("EDGEWARD_ADMIN_ADDR".to_owned(), "nowhere".to_owned())],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("EDGEWARD_ADMIN_ADDR"), "{err}");
    let err = load_from(
        None,
        &json!({}),
        vec![("EDGEWARD_BOGUS".to_owned(), "1".to_owned())],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("EDGEWARD_BOGUS") && err.contains("bogus"),
        "{err}"
    );
}

#[test]
fn invalid_values_name_key_and_value() {
    let err = load_str("shutdown_timeout = \"soon\"\n", &[], json!({}))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("shutdown_timeout") && err.contains("soon"),
        "{err}"
    );
    let err = load_str("[etcd]\nprefix = \"nope/\"\n", &[], json!({}))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("etcd.prefix") && err.contains("nope/"),
        "{err}"
    );
    let err = load_str("node_name = \"bad name\"\n", &[], json!({}))
        .unwrap_err()
        .to_string();
    assert!(err.contains("node_name"), "{err}");
}

#[test]
fn toml_syntax_error_names_the_file() {
    let err = load_str("[admin\n", &[], json!({}))
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("config file "), "{err}");
    assert!(err.contains("line 1") && !err.contains('\n'), "{err}");
}

#[test]
fn env_reaches_keys_in_nested_tables() {
    let config = load_from(
        None,
        &json!({}),
        vec![
            ("EDGEWARD_ETCD_TLS_CA_FILE".to_owned(), "/ca.pem".to_owned()),
            (
                "EDGEWARD_OTLP_TLS_CA_FILE".to_owned(),
                "/otlp-ca.pem".to_owned(),
            ),
        ],
    )
    .unwrap();
    assert_eq!(
        config.etcd.tls.ca_file.as_deref(),
        Some(std::path::Path::new("/ca.pem"))
    );
    assert_eq!(
        config.otlp.tls.ca_file.as_deref(),
        Some(std::path::Path::new("/otlp-ca.pem"))
    );
}
