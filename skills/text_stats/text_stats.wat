;; text_stats: count the bytes, characters, words and lines of a text.
;;
;; Skill ABI v1 (docs/skills.md). The host writes the arguments into memory from
;; `alloc` as canonical JSON, which for this skill's schema is always
;;
;;     {"text":"..."}
;;
;; and calls `run`. We decode the JSON string in a single pass, never building
;; the decoded text, and count as we go:
;;
;;   bytes  the UTF-8 length of the decoded text      (Python: len(t.encode()))
;;   chars  its Unicode code points                     (Python: len(t))
;;   words  maximal runs of characters that are not whitespace, where whitespace
;;          is exactly space, \t, \n, \v, \f and \r
;;   lines  the number of "\n", plus one when the text is not empty and does not
;;          end with "\n" (so "" has 0 lines and "a\nb" has 2)
;;
;; and answer {"ok":{"bytes":B,"chars":C,"lines":L,"words":W}}.
;;
;; Raw (unescaped) bytes in the string are already UTF-8: each one adds a byte,
;; and each one that is not a continuation byte (10xxxxxx) starts a character.
;; Escapes are decoded to a code point; \uXXXX pairs of surrogates make one
;; astral character (4 bytes). A lone surrogate, which canonical JSON never
;; holds, counts as one character of 3 bytes (its WTF-8 length).
;;
;; Memory layout: static strings at 16..395, the heap (bump allocator) from 1024.
(module
  (memory (export "memory") 1)
  (global (export "goclaw_abi") i32 (i32.const 1))

  ;; ---- static data ---------------------------------------------------------
  ;; offset  len  text
  ;;     16    9  {"text":"                        the only input prefix we accept
  ;;     32   15  {"ok":{"bytes":                  the pieces of the answer ...
  ;;     48    9  ,"chars":
  ;;     64    9  ,"lines":
  ;;     80    9  ,"words":
  ;;     96    2  }}
  ;;    112  110  error: the input is not {"text":"..."}
  ;;    224   75  error: a bad escape sequence in the text
  ;;    320   76  error: no memory left for the answer
  (data (i32.const 16) "{\"text\":\"")
  (data (i32.const 32) "{\"ok\":{\"bytes\":")
  (data (i32.const 48) ",\"chars\":")
  (data (i32.const 64) ",\"lines\":")
  (data (i32.const 80) ",\"words\":")
  (data (i32.const 96) "}}")
  (data (i32.const 112)
    "{\"error\":{\"code\":\"bad_input\",\"message\":\"the input must be a JSON object whose only field, text, is a string\"}}")
  (data (i32.const 224)
    "{\"error\":{\"code\":\"bad_input\",\"message\":\"text holds a bad escape sequence\"}}")
  (data (i32.const 320)
    "{\"error\":{\"code\":\"out_of_memory\",\"message\":\"no memory left for the answer\"}}")

  ;; The error answers, packed for run to return.
  (func $error_input (result i64) (call $pack (i32.const 112) (i32.const 110)))
  (func $error_escape (result i64) (call $pack (i32.const 224) (i32.const 75)))
  (func $error_memory (result i64) (call $pack (i32.const 320) (i32.const 76)))

  ;; ---- bump allocator -------------------------------------------------------
  ;; The next free byte. Nothing is ever freed: a fresh instance serves each call.
  (global $heap_top (mut i32) (i32.const 1024))

  ;; alloc(len) -> a pointer to len fresh bytes, 8-aligned; 0 when memory cannot grow.
  (func $alloc (export "alloc") (param $len i32) (result i32)
    (local $ptr i32)
    (local $end i64)        ;; one past the block, in i64 so that it cannot wrap
    (local $pages_needed i32)
    (local.set $ptr
      (i32.and (i32.add (global.get $heap_top) (i32.const 7)) (i32.const -8)))
    (local.set $end
      (i64.add (i64.extend_i32_u (local.get $ptr)) (i64.extend_i32_u (local.get $len))))
    ;; Keep clear of the 4 GiB end of the address space.
    (if (i64.gt_u (local.get $end) (i64.const 0xFFFF0000))
      (then (return (i32.const 0))))
    ;; Grow the memory to cover the block if it does not yet.
    (local.set $pages_needed
      (i32.wrap_i64 (i64.shr_u (i64.add (local.get $end) (i64.const 0xFFFF)) (i64.const 16))))
    (if (i32.gt_u (local.get $pages_needed) (memory.size))
      (then
        (if (i32.eq (memory.grow (i32.sub (local.get $pages_needed) (memory.size)))
                    (i32.const -1))
          (then (return (i32.const 0))))))
    (global.set $heap_top (i32.wrap_i64 (local.get $end)))
    (local.get $ptr))

  ;; (ptr << 32) | len: how run hands back its output.
  (func $pack (param $ptr i32) (param $len i32) (result i64)
    (i64.or
      (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32))
      (i64.extend_i32_u (local.get $len))))

  ;; ---- the counts -----------------------------------------------------------
  (global $bytes (mut i32) (i32.const 0))
  (global $chars (mut i32) (i32.const 0))
  (global $words (mut i32) (i32.const 0))
  (global $newlines (mut i32) (i32.const 0))
  (global $in_word (mut i32) (i32.const 0))       ;; 1 inside a run of non-whitespace
  (global $ends_newline (mut i32) (i32.const 0))  ;; 1 when the last character was \n

  ;; 1 for the six whitespace characters: \t \n \v \f \r (9..13) and space (32).
  (func $is_space (param $cp i32) (result i32)
    (i32.or
      (i32.eq (local.get $cp) (i32.const 32))
      (i32.le_u (i32.sub (local.get $cp) (i32.const 9)) (i32.const 4))))

  ;; One character of the decoded text: count it as a character, and for the
  ;; word and line counts. $cp only needs to be exact below 128 (any larger
  ;; value is neither whitespace nor a newline).
  (func $see_char (param $cp i32)
    (global.set $chars (i32.add (global.get $chars) (i32.const 1)))
    (if (call $is_space (local.get $cp))
      (then (global.set $in_word (i32.const 0)))
      (else
        (if (i32.eqz (global.get $in_word))
          (then
            (global.set $words (i32.add (global.get $words) (i32.const 1)))
            (global.set $in_word (i32.const 1))))))
    (global.set $ends_newline (i32.eq (local.get $cp) (i32.const 10)))
    (if (global.get $ends_newline)
      (then (global.set $newlines (i32.add (global.get $newlines) (i32.const 1))))))

  ;; The UTF-8 length of a code point.
  (func $utf8_len (param $cp i32) (result i32)
    (if (i32.lt_u (local.get $cp) (i32.const 0x80)) (then (return (i32.const 1))))
    (if (i32.lt_u (local.get $cp) (i32.const 0x800)) (then (return (i32.const 2))))
    (if (i32.lt_u (local.get $cp) (i32.const 0x10000)) (then (return (i32.const 3))))
    (i32.const 4))

  ;; The value of one hex digit, or -1.
  (func $hex_digit (param $c i32) (result i32)
    (if (i32.le_u (i32.sub (local.get $c) (i32.const 48)) (i32.const 9))      ;; 0-9
      (then (return (i32.sub (local.get $c) (i32.const 48)))))
    (local.set $c (i32.or (local.get $c) (i32.const 0x20)))                   ;; to lower case
    (if (i32.le_u (i32.sub (local.get $c) (i32.const 97)) (i32.const 5))      ;; a-f
      (then (return (i32.sub (local.get $c) (i32.const 87)))))
    (i32.const -1))

  ;; The value of the four hex digits at $ptr, or -1 if one is not a hex digit.
  (func $hex4 (param $ptr i32) (result i32)
    (local $value i32)
    (local $digit i32)
    (local $i i32)
    (loop $next
      (local.set $digit
        (call $hex_digit (i32.load8_u (i32.add (local.get $ptr) (local.get $i)))))
      (if (i32.lt_s (local.get $digit) (i32.const 0))
        (then (return (i32.const -1))))
      (local.set $value
        (i32.or (i32.shl (local.get $value) (i32.const 4)) (local.get $digit)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $next (i32.lt_u (local.get $i) (i32.const 4))))
    (local.get $value))

  ;; 1 when the $len bytes at $a and $b are the same.
  (func $bytes_equal (param $a i32) (param $b i32) (param $len i32) (result i32)
    (block $differ
      (loop $next
        (if (i32.eqz (local.get $len)) (then (return (i32.const 1))))
        (br_if $differ
          (i32.ne (i32.load8_u (local.get $a)) (i32.load8_u (local.get $b))))
        (local.set $a (i32.add (local.get $a) (i32.const 1)))
        (local.set $b (i32.add (local.get $b) (i32.const 1)))
        (local.set $len (i32.sub (local.get $len) (i32.const 1)))
        (br $next)))
    (i32.const 0))

  ;; ---- writing the answer ---------------------------------------------------
  (global $out (mut i32) (i32.const 0))   ;; where the next output byte goes

  (func $put (param $src i32) (param $len i32)
    (memory.copy (global.get $out) (local.get $src) (local.get $len))
    (global.set $out (i32.add (global.get $out) (local.get $len))))

  ;; The decimal digits of an unsigned number.
  (func $put_u32 (param $n i32)
    (local $digits i32)
    (local $rest i32)
    (local $p i32)
    ;; Count the digits, then write them from the last one back.
    (local.set $digits (i32.const 1))
    (local.set $rest (local.get $n))
    (block $counted
      (loop $more
        (br_if $counted (i32.lt_u (local.get $rest) (i32.const 10)))
        (local.set $rest (i32.div_u (local.get $rest) (i32.const 10)))
        (local.set $digits (i32.add (local.get $digits) (i32.const 1)))
        (br $more)))
    (local.set $p (i32.add (global.get $out) (local.get $digits)))
    (global.set $out (local.get $p))
    (loop $digit
      (local.set $p (i32.sub (local.get $p) (i32.const 1)))
      (i32.store8 (local.get $p)
        (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10))))
      (local.set $n (i32.div_u (local.get $n) (i32.const 10)))
      (br_if $digit (local.get $n))))

  ;; ---- run ------------------------------------------------------------------
  (func $run (export "run") (param $input i32) (param $input_len i32) (result i64)
    (local $pos i32)        ;; the next input byte
    (local $end i32)        ;; one past the last input byte
    (local $byte i32)
    (local $cp i32)         ;; the code point an escape stands for
    (local $low i32)        ;; the second half of a surrogate pair
    (local $answer i32)
    (global.set $bytes (i32.const 0))
    (global.set $chars (i32.const 0))
    (global.set $words (i32.const 0))
    (global.set $newlines (i32.const 0))
    (global.set $in_word (i32.const 0))
    (global.set $ends_newline (i32.const 0))

    ;; The input must start with {"text":" (and will end with "}).
    (if (i32.lt_u (local.get $input_len) (i32.const 11))
      (then (return (call $error_input))))
    (if (i32.eqz (call $bytes_equal (local.get $input) (i32.const 16) (i32.const 9)))
      (then (return (call $error_input))))
    (local.set $pos (i32.add (local.get $input) (i32.const 9)))
    (local.set $end (i32.add (local.get $input) (local.get $input_len)))

    ;; Decode the string up to its closing quote.
    (block $closed
      (loop $next
        (if (i32.ge_u (local.get $pos) (local.get $end))        ;; no closing quote
          (then (return (call $error_input))))
        (local.set $byte (i32.load8_u (local.get $pos)))
        (br_if $closed (i32.eq (local.get $byte) (i32.const 34)))  ;; "

        (if (i32.ne (local.get $byte) (i32.const 92))               ;; not a backslash
          (then
            ;; A raw UTF-8 byte; a lead or ASCII byte starts a character.
            (global.set $bytes (i32.add (global.get $bytes) (i32.const 1)))
            (if (i32.ne (i32.and (local.get $byte) (i32.const 0xC0)) (i32.const 0x80))
              (then (call $see_char (local.get $byte))))
            (local.set $pos (i32.add (local.get $pos) (i32.const 1)))
            (br $next)))

        ;; An escape: a backslash and at least one more byte.
        (if (i32.ge_u (i32.add (local.get $pos) (i32.const 1)) (local.get $end))
          (then (return (call $error_escape))))
        (local.set $byte (i32.load8_u (i32.add (local.get $pos) (i32.const 1))))
        (local.set $pos (i32.add (local.get $pos) (i32.const 2)))
        (local.set $cp (i32.const -1))
        (block $decoded
          ;; \" \\ \/ stand for themselves
          (if (i32.or (i32.eq (local.get $byte) (i32.const 34))
                (i32.or (i32.eq (local.get $byte) (i32.const 92))
                        (i32.eq (local.get $byte) (i32.const 47))))
            (then (local.set $cp (local.get $byte)) (br $decoded)))
          (if (i32.eq (local.get $byte) (i32.const 98))             ;; \b
            (then (local.set $cp (i32.const 8)) (br $decoded)))
          (if (i32.eq (local.get $byte) (i32.const 102))            ;; \f
            (then (local.set $cp (i32.const 12)) (br $decoded)))
          (if (i32.eq (local.get $byte) (i32.const 110))            ;; \n
            (then (local.set $cp (i32.const 10)) (br $decoded)))
          (if (i32.eq (local.get $byte) (i32.const 114))            ;; \r
            (then (local.set $cp (i32.const 13)) (br $decoded)))
          (if (i32.eq (local.get $byte) (i32.const 116))            ;; \t
            (then (local.set $cp (i32.const 9)) (br $decoded)))
          (br_if $decoded (i32.ne (local.get $byte) (i32.const 117)))  ;; not \u: bad
          ;; \uXXXX
          (br_if $decoded
            (i32.gt_u (i32.add (local.get $pos) (i32.const 4)) (local.get $end)))
          (local.set $cp (call $hex4 (local.get $pos)))
          (br_if $decoded (i32.lt_s (local.get $cp) (i32.const 0)))
          (local.set $pos (i32.add (local.get $pos) (i32.const 4)))
          ;; A high surrogate followed by \u and a low surrogate is one character.
          (br_if $decoded
            (i32.gt_u (i32.sub (local.get $cp) (i32.const 0xD800)) (i32.const 0x3FF)))
          (br_if $decoded
            (i32.gt_u (i32.add (local.get $pos) (i32.const 6)) (local.get $end)))
          (br_if $decoded
            (i32.ne (i32.load16_u (local.get $pos)) (i32.const 0x755C)))  ;; "\u" little-endian
          (local.set $low (call $hex4 (i32.add (local.get $pos) (i32.const 2))))
          (br_if $decoded                                          ;; also true for -1
            (i32.gt_u (i32.sub (local.get $low) (i32.const 0xDC00)) (i32.const 0x3FF)))
          (local.set $cp
            (i32.add (i32.const 0x10000)
              (i32.or
                (i32.shl (i32.sub (local.get $cp) (i32.const 0xD800)) (i32.const 10))
                (i32.sub (local.get $low) (i32.const 0xDC00)))))
          (local.set $pos (i32.add (local.get $pos) (i32.const 6))))
        (if (i32.lt_s (local.get $cp) (i32.const 0))
          (then (return (call $error_escape))))
        (global.set $bytes (i32.add (global.get $bytes) (call $utf8_len (local.get $cp))))
        (call $see_char (local.get $cp))
        (br $next)))

    ;; After the closing quote comes the closing brace, and nothing else.
    (if (i32.ne (i32.add (local.get $pos) (i32.const 2)) (local.get $end))
      (then (return (call $error_input))))
    (if (i32.ne (i32.load8_u (i32.add (local.get $pos) (i32.const 1))) (i32.const 125))  ;; }
      (then (return (call $error_input))))

    ;; {"ok":{"bytes":B,"chars":C,"lines":L,"words":W}}: 44 fixed bytes and at
    ;; most 4 * 10 digits.
    (local.set $answer (call $alloc (i32.const 96)))
    (if (i32.eqz (local.get $answer))
      (then (return (call $error_memory))))
    (global.set $out (local.get $answer))
    (call $put (i32.const 32) (i32.const 15))
    (call $put_u32 (global.get $bytes))
    (call $put (i32.const 48) (i32.const 9))
    (call $put_u32 (global.get $chars))
    (call $put (i32.const 64) (i32.const 9))
    (call $put_u32
      (i32.add (global.get $newlines)
        ;; a last line without its "\n"
        (i32.and (i32.ne (global.get $chars) (i32.const 0))
                 (i32.eqz (global.get $ends_newline)))))
    (call $put (i32.const 80) (i32.const 9))
    (call $put_u32 (global.get $words))
    (call $put (i32.const 96) (i32.const 2))
    (call $pack (local.get $answer)
      (i32.sub (global.get $out) (local.get $answer))))
)
