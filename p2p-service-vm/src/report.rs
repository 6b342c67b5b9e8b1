//! How an error is told: one line with every cause, for API messages, the
//! dashboard and logs alike (errors keep their causes as sources; this is
//! where they are read back).

/// Every cause of an error, outermost first, joined for one message line.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let s_msg = s.to_string();
        // Transparent wrappers repeat their source's text; say it once.
        if !msg.ends_with(&s_msg) {
            msg.push_str(": ");
            msg.push_str(&s_msg);
        }
        src = s.source();
    }
    msg
}
