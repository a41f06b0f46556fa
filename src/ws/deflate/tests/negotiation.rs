//! Negotiation: offers, parameters, their syntax, and the response header.

use super::*;

#[test]
fn plain_offer() {
    let a = neg("permessage-deflate", &OFF).unwrap();
    assert_eq!(a, agreed(true, true, 15, 15, false));
    assert_eq!(a.response_header(), BOTH_NCT);
    assert!(a.shareable());

    let a = neg("permessage-deflate", &ON).unwrap();
    assert_eq!(a, agreed(false, false, 15, 15, false));
    assert_eq!(a.response_header(), "permessage-deflate");
    assert!(!a.shareable());
}

#[test]
fn browser_default_offer() {
    let offer = "permessage-deflate; client_max_window_bits";
    let a = neg(offer, &OFF).unwrap();
    assert_eq!(a, agreed(true, true, 15, 15, false));
    assert_eq!(a.response_header(), BOTH_NCT);
    let a = neg(offer, &ON).unwrap();
    assert_eq!(a, agreed(false, false, 15, 15, false));
    assert_eq!(a.response_header(), "permessage-deflate");
}

#[test]
fn each_param() {
    // Context takeover on: we echo what the client asked for.
    let a = neg("permessage-deflate; server_no_context_takeover", &ON).unwrap();
    assert_eq!(a, agreed(true, false, 15, 15, false));
    assert_eq!(
        a.response_header(),
        "permessage-deflate; server_no_context_takeover"
    );
    assert!(a.shareable());

    let a = neg("permessage-deflate; client_no_context_takeover", &ON).unwrap();
    assert_eq!(a, agreed(false, true, 15, 15, false));
    assert_eq!(
        a.response_header(),
        "permessage-deflate; client_no_context_takeover"
    );

    let a = neg("permessage-deflate; server_max_window_bits=10", &ON).unwrap();
    assert_eq!(a, agreed(false, false, 10, 15, true));
    assert_eq!(
        a.response_header(),
        "permessage-deflate; server_max_window_bits=10"
    );
    assert!(!a.shareable());

    let a = neg("permessage-deflate; server_max_window_bits=15", &OFF).unwrap();
    assert_eq!(a, agreed(true, true, 15, 15, true));
    assert_eq!(
        a.response_header(),
        format!("{BOTH_NCT}; server_max_window_bits=15")
    );
    assert!(a.shareable());

    for bits in 9..=15u8 {
        let a = neg(
            &format!("permessage-deflate; server_max_window_bits={bits}"),
            &OFF,
        );
        assert_eq!(a.unwrap().server_max_window_bits, bits);
    }

    let a = neg("permessage-deflate; client_max_window_bits=12", &OFF).unwrap();
    assert_eq!(a, agreed(true, true, 15, 12, false));
    assert_eq!(a.response_header(), BOTH_NCT); // not answered
    let a = neg("permessage-deflate; client_max_window_bits=8", &OFF).unwrap();
    assert_eq!(a.client_max_window_bits, 8);

    let all = "permessage-deflate; server_no_context_takeover; \
               client_no_context_takeover; server_max_window_bits=9; \
               client_max_window_bits=10";
    let a = neg(all, &ON).unwrap();
    assert_eq!(a, agreed(true, true, 9, 10, true));
    assert_eq!(
        a.response_header(),
        format!("{BOTH_NCT}; server_max_window_bits=9")
    );
}

#[test]
fn quoted_values() {
    let a = neg(r#"permessage-deflate; server_max_window_bits="10""#, &OFF).unwrap();
    assert_eq!(a.server_max_window_bits, 10);
    let a = neg(r#"permessage-deflate; client_max_window_bits="9""#, &OFF).unwrap();
    assert_eq!(a.client_max_window_bits, 9);
    let a = neg(r#"permessage-deflate; server_max_window_bits="1\1""#, &OFF).unwrap();
    assert_eq!(a.server_max_window_bits, 11);
    // A comma or semicolon inside quotes does not split (and the
    // value is then not a token, so the offer is declined).
    let h = r#"permessage-deflate; server_max_window_bits="1,0", permessage-deflate"#;
    assert_eq!(negotiate([h], &OFF), neg("permessage-deflate", &OFF));
    for bad in [
        r#"permessage-deflate; server_max_window_bits="10"#,
        r#"permessage-deflate; server_max_window_bits=10""#,
        r#"permessage-deflate; server_max_window_bits="""#,
        r#"permessage-deflate; server_max_window_bits="1 0""#,
        r#"permessage-deflate; server_max_window_bits="1;0""#,
        r#"permessage-deflate; server_no_context_takeover="""#,
        r#"permessage-deflate; server_max_window_bits=""10"""#,
    ] {
        assert_eq!(neg(bad, &OFF), None, "{bad}");
    }
}

#[test]
fn first_acceptable_offer_wins() {
    // RFC 7692 §7.1.3, with a window we cannot honour first.
    let h = "permessage-deflate; client_max_window_bits; server_max_window_bits=8, \
             permessage-deflate; client_max_window_bits";
    let a = negotiate([h], &OFF).unwrap();
    assert_eq!(a, agreed(true, true, 15, 15, false));

    let h = "permessage-deflate; client_max_window_bits; server_max_window_bits=10, \
             permessage-deflate; client_max_window_bits";
    assert_eq!(negotiate([h], &OFF).unwrap().server_max_window_bits, 10);

    // Across header lines, skipping other extensions and bad offers.
    let lines = [
        "x-webkit-deflate-frame",
        "permessage-deflate; foo=1, permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; server_max_window_bits=12, permessage-deflate",
    ];
    assert_eq!(negotiate(lines, &OFF).unwrap().server_max_window_bits, 12);

    // Empty list elements are ignored.
    let a = negotiate([" , ,permessage-deflate ,"], &OFF).unwrap();
    assert_eq!(a, agreed(true, true, 15, 15, false));
}

#[test]
fn no_acceptable_offer() {
    let none: [&str; 0] = [];
    assert_eq!(negotiate(none, &OFF), None);
    for bad in [
        "",
        "x-webkit-deflate-frame",
        "x-webkit-deflate-frame; no_context_takeover",
        "deflate-frame",
        "permessage-deflate-x",
        "permessage-deflate;",
        "permessage-deflate; ; server_no_context_takeover",
        // duplicates
        "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
        "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
        "permessage-deflate; server_max_window_bits=10; server_max_window_bits=10",
        "permessage-deflate; client_max_window_bits; client_max_window_bits",
        "permessage-deflate; client_max_window_bits=10; client_max_window_bits",
        // unknown params
        "permessage-deflate; foo",
        "permessage-deflate; foo=bar",
        "permessage-deflate; no_context_takeover",
        "permessage-deflate; server_max_window_bit=10",
        // values where none is allowed
        "permessage-deflate; server_no_context_takeover=true",
        "permessage-deflate; client_no_context_takeover=1",
        // missing or bad values
        "permessage-deflate; server_max_window_bits",
        "permessage-deflate; server_max_window_bits=",
        "permessage-deflate; server_max_window_bits=7",
        "permessage-deflate; server_max_window_bits=16",
        "permessage-deflate; server_max_window_bits=0",
        "permessage-deflate; server_max_window_bits=09",
        "permessage-deflate; server_max_window_bits=+9",
        "permessage-deflate; server_max_window_bits=-9",
        "permessage-deflate; server_max_window_bits=9a",
        "permessage-deflate; server_max_window_bits=100",
        "permessage-deflate; server_max_window_bits=10=1",
        "permessage-deflate; client_max_window_bits=7",
        "permessage-deflate; client_max_window_bits=16",
        "permessage-deflate; client_max_window_bits=",
        // honourable by the RFC, not by zlib
        "permessage-deflate; server_max_window_bits=8",
        "permessage-deflate; server_max_window_bits=\"8\"",
    ] {
        assert_eq!(neg(bad, &OFF), None, "{bad:?}");
        assert_eq!(neg(bad, &ON), None, "{bad:?}");
    }
}

#[test]
fn lenient_syntax() {
    let a = neg(
        "  PerMessage-Deflate ;\tServer_Max_Window_Bits = 12 ; CLIENT_MAX_WINDOW_BITS  ",
        &ON,
    )
    .unwrap();
    assert_eq!(a, agreed(false, false, 12, 15, true));
    assert_eq!(
        a.response_header(),
        "permessage-deflate; server_max_window_bits=12"
    );
}

#[test]
fn shareable() {
    assert!(agreed(true, false, 15, 10, false).shareable());
    assert!(agreed(true, true, 15, 15, true).shareable());
    assert!(!agreed(false, true, 15, 15, false).shareable());
    assert!(!agreed(true, true, 14, 15, true).shareable());
}
