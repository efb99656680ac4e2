// A BERT WordPiece tokenizer for ASCII text: the query encoder's token ids in one call.
//
// The Hugging Face tokenizer (Rust, behind Python) takes ~20 µs for a short query warm and ~100 µs on the caches a
// query's encode leaves behind: it builds an Encoding with every token's string, offsets and word ids, which the
// encoder never reads. For ASCII text the BERT pipeline is small: clean and lower-case (BertNormalizer), split on
// whitespace and isolate each punctuation character (BertPreTokenizer: every printable ASCII character that is not a
// letter, digit or space), greedy longest-match-first pieces with the "##" prefix inside a word (WordPiece; a word
// longer than max_chars, or one with a part no piece matches, is one unknown token), then [CLS] ... [SEP]
// (TemplateProcessing) after truncation to max_tokens. Text this class does not handle the same way (a character
// outside printable ASCII, tab, newline and carriage return; an added token's text such as "[MASK]") is answered
// "not mine" and goes to the Hugging Face tokenizer, which stays the reference (tests/test_wordpiece.py).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace rag {

class WordPiece {
public:
    // vocab[i] is the piece of id i ("##" prefixed inside a word); `added`: the added tokens' texts, lower-cased
    // (text holding one is not handled here).
    WordPiece(const std::vector<std::string>& vocab, std::int64_t unk_id, std::int64_t cls_id, std::int64_t sep_id,
              std::size_t max_chars, std::size_t max_tokens, std::vector<std::string> added);

    // Appends [CLS], the ids of `text`'s pieces (at most max_tokens) and [SEP] to `out` and returns true; or returns
    // false, `out` unspecified, for text this class does not handle (see the file's comment).
    bool encode(std::string_view text, std::vector<std::int64_t>& out) const;

    std::size_t size() const { return size_; }

private:
    // A piece's id, looked up as it is read (`inner`: after the "##" prefix) without making the piece's string.
    // Open addressing over slots that hold their key: one cache line a look-up, where a node-based map costs two or
    // three misses on the caches an encode leaves, and a word not in the vocabulary costs a look-up per length.
    // kind ('#' inside a word, '\0' at its start), then the piece; a piece of kKey characters or more is in long_.
    static constexpr std::size_t kKey = 22;
    struct Slot {
        char key[kKey + 1];
        std::uint8_t length;  // 0: empty; else 1 + the piece's length
        std::int32_t id;
    };
    static std::uint64_t hash(bool inner, std::string_view piece);
    void insert(bool inner, std::string_view piece, std::int32_t id);
    std::int64_t find(bool inner, std::string_view piece) const;
    void word(std::string_view word, std::vector<std::int64_t>& out) const;

    std::vector<Slot> slots_;
    std::uint64_t mask_ = 0;
    std::unordered_map<std::string, std::int32_t> long_;  // pieces (with their "##") longer than a slot holds
    std::size_t size_ = 0;
    std::size_t longest_ = 0;  // the longest piece, "##" not counted: no longer part of a word can match
    std::int64_t unk_, cls_, sep_;
    std::size_t max_chars_, max_tokens_;
    std::vector<std::string> added_;
};

}  // namespace rag
