//! The CMOS real-time clock at ports 0x70/0x71: host time (UTC), BCD or
//! binary and 12- or 24-hour as the guest selects, a guest-set time kept as
//! an offset from the host's, and an update-in-progress bit that is never set.
//!
//! Why it must answer sensibly: Linux retries a read that sees "update in
//! progress" thousands of times; with an RTC that reads as all ones, a boot
//! under nested virtualization took 12 s longer (`guest-kernel-facts.md` §7).

use std::time::{SystemTime, UNIX_EPOCH};

use crate::devices::bus::MutBusDevice;

const SECONDS: u8 = 0x00;
const MINUTES: u8 = 0x02;
const HOURS: u8 = 0x04;
const WEEKDAY: u8 = 0x06;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
const CENTURY: u8 = 0x32;

/// Register A: 32.768 kHz time base, 1024 Hz rate; bit 7 (UIP) stays clear.
const REG_A_DEFAULT: u8 = 0x26;
/// Register B bit 7: the guest is setting the clock (updates frozen).
const REG_B_SET: u8 = 0x80;
/// Register B bit 2: binary, not BCD.
const REG_B_BINARY: u8 = 0x04;
/// Register B bit 1: 24-hour mode.
const REG_B_24H: u8 = 0x02;
/// Register D bit 7: RAM and time are valid (the battery is fine).
const REG_D_VALID: u8 = 0x80;

/// A broken-down UTC time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    /// Full year.
    pub year: i64,
    /// 1–12.
    pub month: u8,
    /// 1–31.
    pub day: u8,
    /// 0–23.
    pub hour: u8,
    /// 0–59.
    pub minute: u8,
    /// 0–59.
    pub second: u8,
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(year: i64, month: u8, day: u8) -> i64 {
    // Count from March, so the leap day falls at the end of a "year".
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

impl DateTime {
    /// From seconds since the Unix epoch.
    pub fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        // Inverse of `days_from_civil`.
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
        let year = yoe + era * 400 + i64::from(month <= 2);
        Self {
            year,
            month,
            day,
            hour: (rem / 3600) as u8,
            minute: (rem / 60 % 60) as u8,
            second: (rem % 60) as u8,
        }
    }

    /// To seconds since the Unix epoch.
    pub fn to_unix(&self) -> i64 {
        days_from_civil(self.year, self.month, self.day) * 86_400
            + i64::from(self.hour) * 3600
            + i64::from(self.minute) * 60
            + i64::from(self.second)
    }

    /// 1 (Sunday) to 7, as the RTC counts.
    fn weekday(&self) -> u8 {
        // 1970-01-01 was a Thursday.
        ((days_from_civil(self.year, self.month, self.day) + 4).rem_euclid(7) + 1) as u8
    }
}

/// The CMOS device.
#[derive(Debug)]
pub struct Rtc {
    index: u8,
    reg_b: u8,
    /// Guest time minus host time, in seconds (set by the guest writing the clock).
    offset_secs: i64,
    /// Fields written while the guest sets the clock.
    staged: Option<DateTime>,
    /// The other 114 bytes of CMOS RAM.
    ram: [u8; 128],
    now: fn() -> i64,
}

fn host_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Default for Rtc {
    fn default() -> Self {
        Self::with_clock(host_now)
    }
}

impl Rtc {
    /// An RTC reading `now` (seconds since the epoch) as the host's clock.
    pub fn with_clock(now: fn() -> i64) -> Self {
        Self {
            index: 0,
            reg_b: REG_B_24H,
            offset_secs: 0,
            staged: None,
            ram: [0; 128],
            now,
        }
    }

    fn time(&self) -> DateTime {
        self.staged
            .unwrap_or_else(|| DateTime::from_unix((self.now)() + self.offset_secs))
    }

    fn encode(&self, v: u8) -> u8 {
        if self.reg_b & REG_B_BINARY != 0 {
            v
        } else {
            (v / 10) << 4 | (v % 10)
        }
    }

    fn decode(&self, v: u8) -> u8 {
        if self.reg_b & REG_B_BINARY != 0 {
            v
        } else {
            (v >> 4).saturating_mul(10).saturating_add(v & 0xf)
        }
    }

    fn encode_hour(&self, hour: u8) -> u8 {
        if self.reg_b & REG_B_24H != 0 {
            return self.encode(hour);
        }
        let pm = if hour >= 12 { 0x80 } else { 0 };
        let h12 = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(h12) | pm
    }

    fn decode_hour(&self, v: u8) -> u8 {
        if self.reg_b & REG_B_24H != 0 {
            return self.decode(v);
        }
        let h = self.decode(v & 0x7f) % 12;
        if v & 0x80 != 0 { h + 12 } else { h }
    }

    fn read_register(&self, index: u8) -> u8 {
        let t = self.time();
        match index {
            SECONDS => self.encode(t.second),
            MINUTES => self.encode(t.minute),
            HOURS => self.encode_hour(t.hour),
            WEEKDAY => self.encode(t.weekday()),
            DAY => self.encode(t.day),
            MONTH => self.encode(t.month),
            YEAR => self.encode(t.year.rem_euclid(100) as u8),
            CENTURY => self.encode((t.year / 100).clamp(0, 99) as u8),
            REG_A => REG_A_DEFAULT,
            REG_B => self.reg_b,
            // No interrupt sources: reading C finds nothing pending.
            REG_C => 0,
            REG_D => REG_D_VALID,
            i => self.ram[i as usize & 0x7f],
        }
    }

    fn write_register(&mut self, index: u8, value: u8) {
        let setting = self.reg_b & REG_B_SET != 0;
        let mut t = self.time();
        let v = self.decode(value);
        match index {
            SECONDS => t.second = v.min(59),
            MINUTES => t.minute = v.min(59),
            HOURS => t.hour = self.decode_hour(value).min(23),
            DAY => t.day = v.clamp(1, 31),
            MONTH => t.month = v.clamp(1, 12),
            YEAR => t.year = t.year - t.year.rem_euclid(100) + i64::from(v.min(99)),
            CENTURY => t.year = i64::from(v.min(99)) * 100 + t.year.rem_euclid(100),
            REG_A | REG_C | REG_D | WEEKDAY => return,
            REG_B => {
                self.reg_b = value & (REG_B_SET | REG_B_BINARY | REG_B_24H);
                if setting && value & REG_B_SET == 0 {
                    self.commit();
                } else if !setting && value & REG_B_SET != 0 {
                    self.staged = Some(t);
                }
                return;
            }
            i => {
                self.ram[i as usize & 0x7f] = value;
                return;
            }
        }
        if setting {
            self.staged = Some(t);
        } else {
            self.staged = Some(t);
            self.commit();
        }
    }

    fn commit(&mut self) {
        if let Some(t) = self.staged.take() {
            self.offset_secs = t.to_unix() - (self.now)();
        }
    }
}

impl MutBusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if offset == 1
            && let Some(b) = data.first_mut()
        {
            *b = self.read_register(self.index);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            // Bit 7 of the index port masks NMIs on a PC; the index is 7 bits.
            0 => self.index = value & 0x7f,
            _ => self.write_register(self.index, value),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2026-12-02 05:35:25 UTC, a Wednesday.
    const T0: i64 = 1_796_189_725;

    fn fixed() -> i64 {
        T0
    }

    fn read(rtc: &mut Rtc, index: u8) -> u8 {
        rtc.write(0, &[index]);
        let mut b = [0u8];
        rtc.read(1, &mut b);
        b[0]
    }

    fn write(rtc: &mut Rtc, index: u8, v: u8) {
        rtc.write(0, &[index]);
        rtc.write(1, &[v]);
    }

    #[test]
    fn calendar_round_trips() {
        let t = DateTime::from_unix(T0);
        assert_eq!((t.year, t.month, t.day), (2026, 12, 2));
        assert_eq!((t.hour, t.minute, t.second), (5, 35, 25));
        assert_eq!(t.weekday(), 4);
        for secs in [0, 951_782_400, 4_107_542_399, -86_400, T0] {
            assert_eq!(DateTime::from_unix(secs).to_unix(), secs);
        }
        // 2000-02-29 exists, 2100-02-29 does not.
        assert_eq!(DateTime::from_unix(951_782_400).day, 29);
    }

    #[test]
    fn reads_bcd_24h_and_never_updating() {
        let mut rtc = Rtc::with_clock(fixed);
        assert_eq!(read(&mut rtc, REG_A) & 0x80, 0, "UIP never set");
        assert_eq!(read(&mut rtc, SECONDS), 0x25);
        assert_eq!(read(&mut rtc, MINUTES), 0x35);
        assert_eq!(read(&mut rtc, HOURS), 0x05);
        assert_eq!(read(&mut rtc, DAY), 0x02);
        assert_eq!(read(&mut rtc, MONTH), 0x12);
        assert_eq!(read(&mut rtc, YEAR), 0x26);
        assert_eq!(read(&mut rtc, CENTURY), 0x20);
        assert_eq!(read(&mut rtc, REG_D), REG_D_VALID);
    }

    #[test]
    fn binary_and_12h_modes() {
        let mut rtc = Rtc::with_clock(|| T0 + 12 * 3600);
        write(&mut rtc, REG_B, REG_B_BINARY);
        assert_eq!(read(&mut rtc, SECONDS), 25);
        // 17:35 in 12-hour mode is 5 PM.
        assert_eq!(read(&mut rtc, HOURS), 0x80 | 5);
    }

    #[test]
    fn guest_sets_the_clock() {
        let mut rtc = Rtc::with_clock(fixed);
        write(&mut rtc, REG_B, REG_B_SET | REG_B_24H);
        write(&mut rtc, YEAR, 0x30);
        write(&mut rtc, HOURS, 0x23);
        // Frozen while setting.
        assert_eq!(read(&mut rtc, YEAR), 0x30);
        write(&mut rtc, REG_B, REG_B_24H);
        assert_eq!(read(&mut rtc, YEAR), 0x30);
        assert_eq!(read(&mut rtc, HOURS), 0x23);
        assert_eq!(read(&mut rtc, MINUTES), 0x35);
        // CMOS RAM keeps what is written.
        write(&mut rtc, 0x40, 0xab);
        assert_eq!(read(&mut rtc, 0x40), 0xab);
        // Garbage BCD never panics.
        write(&mut rtc, MONTH, 0xff);
        assert!((1..=0x12).contains(&read(&mut rtc, MONTH)));
    }
}
