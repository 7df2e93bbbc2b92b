//! The KcELECTRA cleaning recipe (its README's `clean`): character filter, emoji and URL
//! removal, strip, and soynlp's `repeat_normalize(num_repeats=2)`.

use regex::Regex;
use std::sync::OnceLock;

fn url_pattern() -> &'static Regex {
    static URL: OnceLock<Regex> = OnceLock::new();
    URL.get_or_init(|| {
        Regex::new(r"https?://(www\.)?[-a-zA-Z0-9@:%._+~#=]{1,256}\.[a-zA-Z0-9()]{1,6}\b([-a-zA-Z0-9()@:%_+.~#?&/=]*)")
            .expect("a valid pattern")
    })
}

/// Characters the recipe keeps: ASCII, ` .,?!/@$%~％·∼()`, Hangul jamo ㄱ-ㅣ and syllables 가-힣.
fn kept(c: char) -> bool {
    c.is_ascii() || matches!(c, '％' | '·' | '∼' | 'ㄱ'..='ㅣ' | '가'..='힣')
}

/// Emoji (Extended_Pictographic and their modifiers/joiners); after the character filter only
/// ASCII-range leftovers could remain, so this mirrors `emoji.replace_emoji` closely enough.
fn is_emoji(c: char) -> bool {
    matches!(c as u32, 0x1F000..=0x1FAFF | 0x2600..=0x27BF | 0xFE0F | 0x200D | 0x20E3)
}

/// Python's `\w` for one character: letters, digits (any script) and `_`.
fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// soynlp `repeat_normalize`: a word character repeated 3+ times becomes 2 copies; whitespace
/// runs become one space; the result is stripped.
pub fn repeat_normalize(text: &str, num_repeats: usize) -> String {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let mut j = i + 1;
        while j < chars.len() && chars[j] == c {
            j += 1;
        }
        let run = j - i;
        let keep = if is_word(c) && run >= 3 && num_repeats > 0 {
            num_repeats
        } else {
            run
        };
        for _ in 0..keep {
            out.push(c);
        }
        i = j;
    }
    let mut collapsed = String::with_capacity(out.len());
    let mut in_space = false;
    for c in out.chars() {
        if c.is_whitespace() {
            if !in_space {
                collapsed.push(' ');
            }
            in_space = true;
        } else {
            collapsed.push(c);
            in_space = false;
        }
    }
    collapsed.trim().to_string()
}

/// The full recipe.
pub fn clean(text: &str) -> String {
    let mut filtered = String::with_capacity(text.len());
    let mut in_run = false;
    for c in text.chars() {
        if kept(c) {
            filtered.push(c);
            in_run = false;
        } else if !in_run {
            filtered.push(' ');
            in_run = true;
        }
    }
    let no_emoji: String = filtered.chars().filter(|c| !is_emoji(*c)).collect();
    let no_url = url_pattern().replace_all(&no_emoji, "");
    repeat_normalize(no_url.trim(), 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeats_and_spaces() {
        assert_eq!(repeat_normalize("ㅋㅋㅋㅋㅋ 와아아아  대박", 2), "ㅋㅋ 와아아 대박");
        assert_eq!(repeat_normalize("!!!!! ...", 2), "!!!!! ...");
        assert_eq!(repeat_normalize("  a  b ", 2), "a b");
    }

    #[test]
    fn recipe() {
        assert_eq!(
            clean("진짜 재밌음ㅋㅋㅋㅋ 😂😂 漢字 https://www.example.com/a?b=1 끝"),
            "진짜 재밌음ㅋㅋ 끝"
        );
        assert_eq!(clean("  ＼(^o^)／ 최고!!  "), "(^o^) 최고!!");
    }
}
