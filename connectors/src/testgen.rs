//! Test data: real-looking generated email (deterministic) and malformed
//! messages.

/// A small deterministic PRNG (xorshift64*).
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len() as u64) as usize]
    }
}

const FIRST: &[&str] = &[
    "Ana", "Bruno", "Carla", "Dmitri", "Eva", "Farid", "Greta", "Hiro", "Inês", "João", "Kofi",
    "Lena", "Mateo", "Nadia", "Omar", "Priya", "Quentin", "Rosa", "Sven", "Tomás",
];
const LAST: &[&str] = &[
    "Silva", "Müller", "Okafor", "Tanaka", "Rossi", "Novak", "García", "Larsen", "Dubois",
    "Kowalski", "Haddad", "Nguyen",
];
const DOMAINS: &[&str] = &[
    "example.org",
    "kunde.example.de",
    "client.example.fr",
    "shop.example.com",
    "mail.example.pt",
];
const TOPICS: &[&str] = &[
    "Invoice",
    "Order",
    "Refund request",
    "Delivery delay",
    "Password reset",
    "Contract renewal",
    "Complaint",
    "Question about",
    "Warranty claim",
    "Account closure",
];
const WORDS: &[&str] = &[
    "please", "order", "invoice", "delivery", "thank", "you", "we", "have", "received", "your",
    "request", "the", "package", "was", "damaged", "refund", "account", "contract", "next", "week",
    "regards", "support", "team", "number", "attached", "kindly", "confirm", "date",
];

fn person(rng: &mut Rng) -> (String, String) {
    let f = rng.pick(FIRST);
    let l = rng.pick(LAST);
    let d = rng.pick(DOMAINS);
    let local: String = format!("{f}.{l}")
        .to_lowercase()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' {
                c
            } else {
                'x'
            }
        })
        .collect();
    (format!("{f} {l}"), format!("{local}@{d}"))
}

fn encode_name(name: &str) -> String {
    if name.is_ascii() {
        format!("\"{name}\"")
    } else {
        use base64::Engine as _;
        format!(
            "=?UTF-8?B?{}?=",
            base64::engine::general_purpose::STANDARD.encode(name.as_bytes())
        )
    }
}

/// One real-looking message (CRLF line ends), number `i` of `seed`.
/// About one in eight has a small PDF attachment; some bodies contain lines
/// starting with `From ` and `>From ` (for mbox quoting).
pub(crate) fn message(seed: u64, i: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed ^ (i.wrapping_mul(0x1000_0001)));
    let (fname, from) = person(&mut rng);
    let (tname, to) = person(&mut rng);
    let (_, cc) = person(&mut rng);
    let topic = rng.pick(TOPICS);
    let day = 1 + rng.below(28);
    let hour = rng.below(24);
    let min = rng.below(60);
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = rng.pick(&months);
    let year = 2019 + rng.below(6);
    let mut h = String::new();
    h.push_str(&format!(
        "Return-Path: <{from}>\r\nFrom: {} <{from}>\r\nTo: {} <{to}>\r\n",
        encode_name(&fname),
        encode_name(&tname)
    ));
    if rng.below(3) == 0 {
        h.push_str(&format!("Cc: {cc}\r\n"));
    }
    h.push_str(&format!(
        "Subject: {topic} #{}\r\nDate: Mon, {day} {month} {year} {hour:02}:{min:02}:00 +0100\r\nMessage-ID: <{seed}.{i}.{}@{}>\r\nMIME-Version: 1.0\r\n",
        10000 + i,
        rng.next() % 1_000_000,
        rng.pick(DOMAINS)
    ));
    let mut body = String::new();
    let lines = 3 + rng.below(60);
    for l in 0..lines {
        let n = 4 + rng.below(12);
        let words: Vec<&str> = (0..n).map(|_| *rng.pick(WORDS)).collect();
        let mut line = words.join(" ");
        if l == 1 && rng.below(10) == 0 {
            line = format!("From the desk of {fname}: {line}");
        }
        if l == 2 && rng.below(10) == 0 {
            line = format!(">From an earlier mail: {line}");
        }
        body.push_str(&line);
        body.push_str("\r\n");
    }
    body.push_str(&format!("\r\n-- \r\n{fname}\r\n"));
    let mut out = h.into_bytes();
    if rng.below(8) == 0 {
        use base64::Engine as _;
        let boundary = format!("b{}", rng.next());
        let len = 200 + rng.below(3000) as usize;
        let pdf: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        let b64 = base64::engine::general_purpose::STANDARD.encode(&pdf);
        out.extend_from_slice(
            format!("Content-Type: multipart/mixed; boundary=\"{boundary}\"\r\n\r\n--{boundary}\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}--{boundary}\r\nContent-Type: application/pdf; name=\"invoice-{i}.pdf\"\r\nContent-Disposition: attachment; filename=\"invoice-{i}.pdf\"\r\nContent-Transfer-Encoding: base64\r\n\r\n").as_bytes(),
        );
        for chunk in b64.as_bytes().chunks(76) {
            out.extend_from_slice(chunk);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    } else {
        out.extend_from_slice(b"Content-Type: text/plain; charset=utf-8\r\n\r\n");
        out.extend_from_slice(body.as_bytes());
    }
    out
}

/// A message whose MIME structure is broken (unterminated multipart, bad
/// boundary, garbage transfer encoding).
pub(crate) fn broken_mime() -> Vec<u8> {
    b"From: broken@example.org\r\nSubject: broken mime\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"never-closed\r\n\r\n--never-closed\r\nContent-Type: text/plain\r\nContent-Transfer-Encoding: base64\r\n\r\n!!!not base64!!!\r\n--never-clo".to_vec()
}

/// A message with raw non-UTF-8 bytes in its headers.
pub(crate) fn invalid_utf8_headers() -> Vec<u8> {
    b"From: \xff\xfe Sch\xf6n <schoen@example.de>\r\nTo: a@example.org\r\nSubject: Gr\xfc\xdfe \xc3\x28 aus K\xf6ln\r\nDate: Tue, 1 Jul 2003 10:52:37 +0200\r\n\r\nLatin-1 body: \xe4\xf6\xfc\r\n".to_vec()
}

/// A message with one attachment of `mb` MiB (base64, CRLF lines).
pub(crate) fn big_attachment(mb: usize) -> Vec<u8> {
    let mut out = b"From: big@example.org\r\nTo: archive@example.org\r\nSubject: big attachment\r\nMessage-ID: <big@example.org>\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"BIG\"\r\n\r\n--BIG\r\nContent-Type: text/plain\r\n\r\nsee attachment\r\n--BIG\r\nContent-Type: application/octet-stream; name=\"big.bin\"\r\nContent-Disposition: attachment; filename=\"big.bin\"\r\nContent-Transfer-Encoding: base64\r\n\r\n".to_vec();
    // 57 raw bytes per 76-char base64 line; a repeating but non-trivial pattern.
    let line_count = mb * 1024 * 1024 / 57;
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    out.reserve(line_count * 78 + 64);
    for l in 0..line_count {
        for k in 0..76 {
            out.push(alphabet[(l * 7 + k * 13) % 64]);
        }
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"--BIG--\r\n");
    out
}
