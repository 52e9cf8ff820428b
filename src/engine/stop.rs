//! Stop strings: text is streamed as soon as it cannot be the start of a stop string, and
//! generation ends before the first stop string, which never reaches the client.

/// Watches streamed text for stop strings.
pub struct StopMatcher {
    stops: Vec<String>,
    /// Text received but not yet released: it might be the start of a stop string.
    pending: String,
}

/// What the caller should do with a chunk of text.
#[derive(Debug, PartialEq, Eq)]
pub enum StopOutcome {
    /// Emit this text (maybe empty) and go on.
    Continue(String),
    /// Emit this text, then stop: the stop string (second) was found right after it.
    Stop(String, String),
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> StopMatcher {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// Adds generated text.
    pub fn push(&mut self, text: &str) -> StopOutcome {
        self.pending.push_str(text);
        if let Some((at, i)) = self
            .stops
            .iter()
            .enumerate()
            .filter_map(|(i, s)| self.pending.find(s.as_str()).map(|at| (at, i)))
            .min()
        {
            let out = self.pending[..at].to_string();
            self.pending.clear();
            return StopOutcome::Stop(out, self.stops[i].clone());
        }
        // Hold back the longest tail that is a proper prefix of some stop string.
        let hold = self
            .stops
            .iter()
            .flat_map(|s| {
                s.char_indices()
                    .skip(1)
                    .map(|(i, _)| &s[..i])
                    .filter(|p| self.pending.ends_with(p))
                    .map(str::len)
            })
            .max()
            .unwrap_or(0);
        let cut = self.pending.len() - hold;
        let out = self.pending[..cut].to_string();
        self.pending.drain(..cut);
        StopOutcome::Continue(out)
    }

    /// The text still held back when generation ends for another reason.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(stops: &[&str]) -> StopMatcher {
        StopMatcher::new(&stops.iter().map(|s| s.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn passes_text_without_stops() {
        let mut s = m(&[]);
        assert_eq!(s.push("hello"), StopOutcome::Continue("hello".into()));
    }

    #[test]
    fn stops_before_the_stop_string_across_chunks() {
        let mut s = m(&["\nUser:"]);
        assert_eq!(s.push("Sure.\nU"), StopOutcome::Continue("Sure.".into()));
        assert_eq!(s.push("se"), StopOutcome::Continue("".into()));
        assert_eq!(
            s.push("r: hi"),
            StopOutcome::Stop("".into(), "\nUser:".into())
        );
    }

    #[test]
    fn releases_a_false_alarm() {
        let mut s = m(&["END"]);
        assert_eq!(s.push("the EN"), StopOutcome::Continue("the ".into()));
        assert_eq!(s.push("D"), StopOutcome::Stop("".into(), "END".into()));
        let mut s = m(&["END"]);
        assert_eq!(s.push("EN"), StopOutcome::Continue("".into()));
        assert_eq!(s.push("ergy"), StopOutcome::Continue("ENergy".into()));
        assert_eq!(s.push("E"), StopOutcome::Continue("".into()));
        assert_eq!(s.flush(), "E");
    }

    #[test]
    fn earliest_stop_wins_and_unicode_is_safe() {
        let mut s = m(&["bb", "a"]);
        assert_eq!(s.push("xxbba"), StopOutcome::Stop("xx".into(), "bb".into()));
        let mut s = m(&["é!"]);
        assert_eq!(s.push("caf\u{e9}"), StopOutcome::Continue("caf".into()));
        assert_eq!(s.push("?"), StopOutcome::Continue("\u{e9}?".into()));
    }
}
