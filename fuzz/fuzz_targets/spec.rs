//! The text the CLI and the API take from users: `--publish` and `--publish-rm` specs and the
//! join token. Never panics; what parses obeys the rules, and a removal parsed from a publish
//! spec matches that publish.
#![no_main]

use libfuzzer_sys::fuzz_target;
use overlayd::model::Publish;
use overlayd::publish::Unpublish;
use overlayd::token::Secret;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(publish) = text.parse::<Publish>() {
        publish.check().expect("a parsed publish obeys the rules");
        let rm: Unpublish = text.parse().expect("a publish spec names a removal");
        assert!(rm.matches(&publish));
        publish.to_string();
    }
    if let Ok(rm) = text.parse::<Unpublish>() {
        rm.to_string();
    }
    if let Ok(secret) = Secret::from_token(text) {
        let again = Secret::from_token(&secret.token()).expect("a token re-reads");
        assert_eq!(again.cluster_id(), secret.cluster_id());
    }
});
