//! Tests of the configuration: defaults, layering, validation.

use std::time::Duration;

use super::*;

#[test]
fn defaults_are_the_documented_ones() {
    let c = Config::default();
    assert_eq!(c.port, 8080);
    assert_eq!(c.max_message_size, 65536);
    assert_eq!(c.ping_interval, Duration::from_secs(30));
    assert_eq!(c.bus, BusConfig::Memory);
    assert!(c.channel_echo);
}

#[test]
fn flags_win_over_file() {
    let flags = Settings {
        port: Some(9000),
        ..Default::default()
    };
    let file: Settings = toml::from_str(
        "port = 7000\nmax_subscriptions = 3\n[namespaces.chat]\nhistory_size = 5\npresence = false\njoin_leave = false\n",
    )
    .unwrap();
    let c = Config::from_settings(flags.layered_over(file)).unwrap();
    assert_eq!(c.port, 9000);
    assert_eq!(c.max_subscriptions, 3);
    let chat = c.namespace_of("chat:room").unwrap();
    assert_eq!(chat.history_size, 5);
    assert!(!chat.presence);
    assert_eq!(c.namespace_of("other:x"), Some(&c.default_namespace));
}

#[test]
fn bad_values_are_refused_with_the_option_name() {
    let err = toml::from_str::<Settings>("no_such_option = 1").unwrap_err();
    assert!(err.to_string().contains("no_such_option"));
    let s = Settings {
        bus: Some("carrier-pigeon://x".into()),
        ..Default::default()
    };
    assert_eq!(
        "redis://127.0.0.1:6379/2".parse::<BusConfig>().unwrap(),
        BusConfig::Redis {
            url: "redis://127.0.0.1:6379/2".into()
        }
    );
    assert_eq!(
        "pubsub://my-project".parse::<BusConfig>().unwrap(),
        BusConfig::PubSub {
            project: "my-project".into()
        }
    );
    assert!("redis://".parse::<BusConfig>().is_err());
    assert_eq!(
        "redis+cluster://a:7000,b:7001"
            .parse::<BusConfig>()
            .unwrap(),
        BusConfig::Redis {
            url: "redis+cluster://a:7000,b:7001".into()
        }
    );
    let err = Config::from_settings(s).unwrap_err().to_string();
    assert!(err.contains("bus"), "{err}");
    let s = Settings {
        max_subscriptions: Some(0),
        ..Default::default()
    };
    let err = Config::from_settings(s).unwrap_err().to_string();
    assert!(err.contains("max_subscriptions"), "{err}");
    let s = Settings {
        max_message_size: Some((1 << 30) + 1),
        ..Default::default()
    };
    let err = Config::from_settings(s).unwrap_err().to_string();
    assert!(
        err.contains("max_message_size") && err.contains("1 GiB"),
        "{err}"
    );
}

#[test]
fn strict_namespaces_refuse_unknown_prefixes() {
    let s = Settings {
        strict_namespaces: Some(true),
        ..Default::default()
    };
    let c = Config::from_settings(s).unwrap();
    assert!(c.namespace_of("nope:x").is_none());
    assert!(c.namespace_of("plain").is_some());
}

/// Every `Settings` field, set from the TOML file: one line per flag that
/// clap knows (its id is the field's name), with the first sample value
/// that field's type accepts, and a namespace.
fn every_setting() -> Settings {
    use clap::Args;
    const SAMPLES: &[&str] = &[
        "1",
        "true",
        "\"1s\"",
        "\"127.0.0.1\"",
        "\"disconnect\"",
        "\"json\"",
        "[\"x\"]",
        "\"x\"",
    ];
    let cmd = Settings::augment_args(clap::Command::new("t"));
    let mut text = String::new();
    for arg in cmd.get_arguments() {
        let key = arg.get_id().as_str();
        let line = SAMPLES
            .iter()
            .map(|v| format!("{key} = {v}\n"))
            .find(|line| toml::from_str::<Settings>(line).is_ok())
            .unwrap_or_else(|| panic!("no sample value fits {key}: add one to SAMPLES"));
        text.push_str(&line);
    }
    text.push_str("[namespaces.chat]\nhistory_size = 5\n");
    let all: Settings = toml::from_str(&text).unwrap();
    let unset = unset_fields(&all);
    assert!(unset.is_empty(), "not settable from the file: {unset:?}");
    all
}

/// The fields of `s` (not of its namespaces) that are `None`.
fn unset_fields(s: &Settings) -> Vec<String> {
    format!("{s:#?}")
        .lines()
        .filter(|l| l.starts_with("    ") && !l.starts_with("     ") && l.ends_with(": None,"))
        .map(|l| l.trim().trim_end_matches(": None,").to_string())
        .collect()
}

#[test]
fn layering_keeps_every_field() {
    // A field missing from `layered_over`'s `fill!` list would be lost
    // from the lower layer (a TOML key that does nothing under flags).
    let all = every_setting();
    let from_lower = Settings::default().layered_over(all.clone());
    let lost = unset_fields(&from_lower);
    assert!(
        lost.is_empty(),
        "add to the fill! list in layered_over: {lost:?}"
    );
    assert_eq!(format!("{from_lower:#?}"), format!("{all:#?}"));
    let from_upper = all.clone().layered_over(Settings::default());
    assert_eq!(format!("{from_upper:#?}"), format!("{all:#?}"));
}

#[test]
fn cache_and_idempotency_window_per_namespace() {
    let file: Settings = toml::from_str(
        "idempotency_window = \"2m\"\n[namespaces.ticker]\ncache = true\nhistory_size = 1\nidempotency_window = \"10s\"\n[namespaces.chat]\n",
    )
    .unwrap();
    let c = Config::from_settings(file).unwrap();
    let ticker = c.namespace_of("ticker:x").unwrap();
    assert!(ticker.cache);
    assert_eq!(ticker.idempotency_window, Duration::from_secs(10));
    let chat = c.namespace_of("chat:x").unwrap();
    assert!(!chat.cache);
    assert_eq!(chat.idempotency_window, Duration::from_secs(120));
    assert!(
        c.namespace_of("sys:metrics").unwrap().cache,
        "sys is last-value"
    );
    assert_eq!(
        Config::default().default_namespace.idempotency_window,
        Duration::from_secs(300)
    );
    let no_history: Settings =
        toml::from_str("[namespaces.t]\ncache = true\nhistory_size = 0\n").unwrap();
    let err = Config::from_settings(no_history).unwrap_err().to_string();
    assert!(
        err.contains("namespaces.t") && err.contains("cache"),
        "{err}"
    );
}
