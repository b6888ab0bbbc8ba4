//! Client messages as the WebSocket receives them: parsing must return a message or an error,
//! never panic; a parsed message must serialise again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use livegrid_protocol::ClientMessage;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(message) = serde_json::from_str::<ClientMessage>(text)
    {
        let _ = serde_json::to_string(&message).expect("a parsed message serialises");
    }
});
