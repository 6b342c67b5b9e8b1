;; A hash chain: the example compute job (WebAssembly text; p2pvm compiles
;; it as it is, no toolchain needed).
;;
;; Input:  8 bytes, little-endian: how many rounds; then the data.
;; Output: 16 hex digits, the final 64-bit state.
;;
;; Each round folds every 8-byte word of the data (zero-padded) into the
;; state; every step depends on the one before, so the work cannot be split
;; or skipped: it is what a provider must really spend to answer.
;; `p2pvm_compute::reference::hashchain` is the same function in Rust.
(module
  (import "p2pvm" "input_len" (func $input_len (result i64)))
  (import "p2pvm" "input_read" (func $input_read (param i32 i64 i32) (result i32)))
  (import "p2pvm" "output_write" (func $output_write (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "run") (result i32)
    (local $len i64) (local $n i32) (local $rounds i64) (local $r i64)
    (local $p i32) (local $end i32) (local $h i64) (local $k i32) (local $d i64)
    (local.set $len (call $input_len))
    ;; No round count: bad input.
    (if (i64.lt_u (local.get $len) (i64.const 8)) (then (return (i32.const 1))))
    (if (i64.gt_u (local.get $len) (i64.const 0x7fff0000)) (then (return (i32.const 2))))
    (local.set $n (i32.wrap_i64 (local.get $len)))
    ;; Room for the input at offset 64, plus a padding word.
    (if (i32.lt_s
          (memory.grow (i32.sub (i32.shr_u (i32.add (local.get $n) (i32.const 65607)) (i32.const 16))
                                (memory.size)))
          (i32.const 0))
      (then (return (i32.const 3))))
    (drop (call $input_read (i32.const 64) (i64.const 0) (local.get $n)))
    (local.set $rounds (i64.load (i32.const 64)))
    (local.set $end
      (i32.add (i32.const 72)
               (i32.and (i32.add (i32.sub (local.get $n) (i32.const 8)) (i32.const 7)) (i32.const -8))))
    (local.set $h (i64.const 0x243F6A8885A308D3))
    (block $done
      (loop $round
        (br_if $done (i64.ge_u (local.get $r) (local.get $rounds)))
        (local.set $p (i32.const 72))
        (block $words_done
          (loop $word
            (br_if $words_done (i32.ge_u (local.get $p) (local.get $end)))
            (local.set $h
              (i64.mul (i64.rotl (i64.xor (local.get $h) (i64.load (local.get $p))) (i64.const 29))
                       (i64.const 0x9E3779B97F4A7C15)))
            (local.set $h (i64.xor (local.get $h) (i64.shr_u (local.get $h) (i64.const 32))))
            (local.set $p (i32.add (local.get $p) (i32.const 8)))
            (br $word)))
        (local.set $h (i64.add (local.get $h) (local.get $r)))
        (local.set $r (i64.add (local.get $r) (i64.const 1)))
        (br $round)))
    ;; The state as 16 lowercase hex digits at offset 32.
    (block $hex_done
      (loop $hex
        (br_if $hex_done (i32.ge_u (local.get $k) (i32.const 16)))
        (local.set $d
          (i64.and (i64.shr_u (local.get $h)
                              (i64.extend_i32_u (i32.sub (i32.const 60) (i32.shl (local.get $k) (i32.const 2)))))
                   (i64.const 15)))
        (i32.store8 (i32.add (i32.const 32) (local.get $k))
          (i32.wrap_i64
            (i64.add (local.get $d)
                     (select (i64.const 48) (i64.const 87) (i64.lt_u (local.get $d) (i64.const 10))))))
        (local.set $k (i32.add (local.get $k) (i32.const 1)))
        (br $hex)))
    (drop (call $output_write (i32.const 32) (i32.const 16)))
    (i32.const 0)))
